#!/usr/bin/env bash
# Measures the store (`sluice-bench store`) against the raw device (`sluice-bench device`)
# on the same file, back to back, and prints the ratios of the store bar
# (docs/benchmarks.md):
#   4 KiB durable object writes at QD32 (new objects, and overwrites of random prefilled
#   objects) vs the device's 4 KiB randwrite QD32 *without* flushes;
#   4 KiB object reads at QD32 (random prefilled objects) vs the device's randread QD32.
# The virtual disk drifts by tens of percent within minutes, so each pair runs ROUNDS
# times, alternating which goes first; the ratio of the sums and the median of the
# per-round ratios are printed.
#
#   usage: scripts/bench-store-vs-device.sh [FILE] [RUNTIME_S]  (defaults: /var/tmp/sluice/store.dev 10)
#   env:   ROUNDS (default 3), DEV_SIZE (default 4G), OBJECTS (default: the store bench's)
#   needs: python3; builds sluice-bench in release mode. FILE's content is destroyed.
set -euo pipefail
cd "$(dirname "$0")/.."
FILE=${1:-/var/tmp/sluice/store.dev}
RT=${2:-10}
ROUNDS=${ROUNDS:-3}
DEV_SIZE=${DEV_SIZE:-4G}
OUT=${OUT:-bench-out/store-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT" "$(dirname "$FILE")"
cargo build --release -q -p sluice-bench
BENCH=./target/release/sluice-bench
objects=()
[ -n "${OBJECTS:-}" ] && objects=(--objects "$OBJECTS")

device() { # tag rw
  $BENCH device --path "$FILE" --dev-size "$DEV_SIZE" --rw "$2" --bs 4k --qd 32 \
    --runtime "${RT}s" --quiet --json "$OUT/$1.json" >/dev/null 2>&1
}
store() { # tag rw
  $BENCH store --path "$FILE" --dev-size "$DEV_SIZE" --rw "$2" --size 4k --qd 32 \
    "${objects[@]}" --runtime "${RT}s" --quiet --json "$OUT/$1.json" >/dev/null 2>&1
}

for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r of $ROUNDS"
  for pair in "write randwrite write" "randwrite randwrite randwrite" "randread randread randread"; do
    set -- $pair
    if [ $((r % 2)) = 1 ]; then
      store "$1.store.$r" "$3"; device "$1.device.$r" "$2"
    else
      device "$1.device.$r" "$2"; store "$1.store.$r" "$3"
    fi
  done
done

python3 - "$OUT" "$ROUNDS" <<'PY'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
def res(name, kind, r): return json.load(open(f"{out}/{name}.{kind}.{r}.json"))["results"]
bars = {"write": 0.80, "randwrite": 0.80, "randread": 0.85}
summary = []
print(f"{'store workload':<16}{'device':<12}{'store IOPS':>12}{'device IOPS':>13}{'ratio(sum)':>12}{'ratio(med)':>12}{'bar':>6}{'store p50':>12}{'p99.9':>10}{'max':>10}")
for name, dev in [("write", "randwrite"), ("randwrite", "randwrite"), ("randread", "randread")]:
    st = [res(name, "store", r) for r in range(1, rounds + 1)]
    dv = [res(name, "device", r) for r in range(1, rounds + 1)]
    si, di = [x["iops"] for x in st], [x["iops"] for x in dv]
    ratio_sum = sum(si) / sum(di)
    ratio_med = statistics.median(a / b for a, b in zip(si, di))
    p50 = statistics.median(x["p50_us"] for x in st)
    p999 = statistics.median(x["p999_us"] for x in st)
    mx = max(x["max_us"] for x in st)
    print(f"{name:<16}{dev:<12}{statistics.mean(si):>12.0f}{statistics.mean(di):>13.0f}{ratio_sum:>12.2f}{ratio_med:>12.2f}{bars[name]:>6.2f}{p50:>10.0f}us{p999:>8.0f}us{mx/1e3:>8.0f}ms")
    summary.append(dict(workload=name, device=dev, store_iops=si, device_iops=di, ratio_sum=ratio_sum, ratio_median=ratio_med, bar=bars[name]))
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(f"reports in {out}/")
PY
