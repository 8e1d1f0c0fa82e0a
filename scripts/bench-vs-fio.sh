#!/usr/bin/env bash
# Measures `sluice-bench device` against fio on the same file, back to back, and prints
# the ratios of the foundation bar (docs/benchmarks.md):
#   4 KiB randread QD32, 4 KiB randwrite QD32, 4 KiB randwrite QD1 with a flush per write
#   (fio --fsync=1; fio --fdatasync=1 is also run, since our flush is fdatasync).
# The virtual disk drifts by tens of percent within minutes, so each workload runs
# ROUNDS times, alternating which tool goes first; the ratio of the sums and the median
# of the per-round ratios are printed.
#
#   usage: scripts/bench-vs-fio.sh [FILE] [RUNTIME_S]   (defaults: /var/tmp/sluice/dev 10)
#   env:   ROUNDS (default 3), SLUICE_ARGS (extra sluice-bench device options)
#   needs: fio, python3; builds sluice-bench in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
FILE=${1:-/var/tmp/sluice/dev}
RT=${2:-10}
ROUNDS=${ROUNDS:-3}
OUT=${OUT:-bench-out/fio-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" "$(dirname "$FILE")"
command -v fio >/dev/null || { echo "fio is not installed (apt-get install fio)" >&2; exit 2; }
cargo build --release -q -p sluice-bench
BENCH=./target/release/sluice-bench

# Create and fill the file once (sluice-bench does it when the file is missing or sparse).
$BENCH device --path "$FILE" --dev-size 4G --rw randread --qd 1 --runtime 1s --quiet >/dev/null

sluice() { # tag rw qd flush_every
  $BENCH device --path "$FILE" --rw "$2" --bs 4k --qd "$3" --flush-every "$4" \
    --runtime "${RT}s" --quiet ${SLUICE_ARGS:-} --json "$OUT/$1.json" >/dev/null 2>&1
}
fio_() { # tag rw qd sync-option
  local extra=()
  [ -n "$4" ] && extra=("$4")
  fio --name=x --filename="$FILE" --ioengine=io_uring --direct=1 --rw="$2" --bs=4k \
    --iodepth="$3" --runtime="$RT" --time_based --size=4G "${extra[@]}" \
    --output-format=json --output="$OUT/$1.json" >/dev/null
}

for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r of $ROUNDS"
  for w in "randread randread 32 0" "randwrite randwrite 32 0" "qd1flush randwrite 1 1"; do
    set -- $w
    sync=""; [ "$4" -gt 0 ] && sync="--fsync=$4"
    if [ $((r % 2)) = 1 ]; then
      sluice "$1.sluice.$r" "$2" "$3" "$4"; fio_ "$1.fio.$r" "$2" "$3" "$sync"
    else
      fio_ "$1.fio.$r" "$2" "$3" "$sync"; sluice "$1.sluice.$r" "$2" "$3" "$4"
    fi
    [ "$1" = qd1flush ] && fio_ "$1.fiodsync.$r" "$2" "$3" "--fdatasync=1"
  done
done

python3 - "$OUT" "$ROUNDS" <<'PY'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
def s(name, r): return json.load(open(f"{out}/{name}.sluice.{r}.json"))["results"]
def f(name, r, kind="fio"):
    j = json.load(open(f"{out}/{name}.{kind}.{r}.json"))["jobs"][0]
    return j["read" if "read" in name else "write"]
summary = []
print(f"{'workload':<12}{'baseline':<16}{'sluice IOPS':>12}{'fio IOPS':>10}{'ratio(sum)':>12}{'ratio(med)':>12}{'sluice p50':>12}{'fio p50':>10}")
for name in ["randread", "randwrite", "qd1flush"]:
    for kind in (["fio", "fiodsync"] if name == "qd1flush" else ["fio"]):
        si = [s(name, r)["iops"] for r in range(1, rounds + 1)]
        fi = [f(name, r, kind)["iops"] for r in range(1, rounds + 1)]
        sp = statistics.median(s(name, r)["p50_us"] for r in range(1, rounds + 1))
        fp = statistics.median(f(name, r, kind)["clat_ns"]["percentile"]["50.000000"] / 1e3 for r in range(1, rounds + 1))
        ratio_sum = sum(si) / sum(fi)
        ratio_med = statistics.median(a / b for a, b in zip(si, fi))
        label = "fio --fsync=1" if kind == "fio" and name == "qd1flush" else ("fio --fdatasync=1" if kind == "fiodsync" else "fio")
        print(f"{name:<12}{label:<16}{statistics.mean(si):>12.0f}{statistics.mean(fi):>10.0f}{ratio_sum:>12.2f}{ratio_med:>12.2f}{sp:>10.1f}us{fp:>8.1f}us")
        summary.append(dict(workload=name, baseline=label, sluice_iops=si, fio_iops=fi, ratio_sum=ratio_sum, ratio_median=ratio_med))
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(f"reports in {out}/  (p50: sluice's is the I/O's own latency; fio's is clat)")
PY
