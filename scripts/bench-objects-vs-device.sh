#!/usr/bin/env bash
# Measures objects through one local OSD (pool size 1, file-backed device) against the
# raw device on the same file system, back to back (issue 5's bar, docs/benchmarks.md):
#   4 KiB write QD1 median  vs  device 4 KiB randwrite QD1 with a flush after each write
#                               + the loopback round trip (`sluice-bench net`: 64-byte
#                               TCP ping-pong between two blocking threads, median)
#   4 KiB write / randread QD32  vs  device 4 KiB randwrite / randread QD32
#   4 MiB writes (QD4)  vs  device 1 MiB sequential write bandwidth (QD4)
# and the OSD's CPU per I/O (from /proc, all sluice-osd processes on this machine).
# The null network (`sluice-bench net --size 4M --qd 4`) is reported beside the 4 MiB
# figure: what loopback TCP alone carries on this machine, before any store.
#
#   usage: scripts/bench-objects-vs-device.sh [DIR] [RUNTIME_S]  (defaults: /var/tmp/sluice/objbench 10)
#   env:   DEV_SIZE (default 4G), ROUNDS (default 3)
#   needs: python3; builds release binaries. DIR's content is destroyed.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/var/tmp/sluice/objbench}
RT=${2:-10}
DEV_SIZE=${DEV_SIZE:-4G}
OUT=${OUT:-bench-out/objects-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
cargo build --release -q --bins
B=./target/release
$B/sluice dev down --dir "$DIR/cluster" >/dev/null 2>&1 || true
rm -rf "$DIR"; mkdir -p "$DIR"
# The OSD's device file is written in full first, like the baseline's: writes into the
# holes of a sparse file make every fdatasync commit the file system's journal (QD1
# writes measured ~330 us instead of ~190 us), which no block device pays.
mkdir -p "$DIR/cluster"
dd if=/dev/zero of="$DIR/cluster/osd.0.dev" bs=4M count=$(( $(numfmt --from=iec "$DEV_SIZE") / 4194304 )) oflag=direct status=none
$B/sluice dev up --dir "$DIR/cluster" --mons 1 --osds 1 --device-size "$DEV_SIZE" >/dev/null
trap '$B/sluice dev down --dir "$DIR/cluster" >/dev/null 2>&1 || true' EXIT
CONF="$DIR/cluster/sluice.conf"
$B/sluice -c "$CONF" pool create bench --size 1 --pg-num 64 >/dev/null
FILE="$DIR/device.raw"

obj() { # tag rw size qd objects
  $B/sluice-bench objects -c "$CONF" --pool bench --rw "$2" --size "$3" --qd "$4" \
    --objects "$5" --runtime "${RT}s" --quiet --json "$OUT/$1.json" | grep -E 'OSD CPU' || true
}
dev() { # tag rw bs qd [flush-every]
  $B/sluice-bench device --path "$FILE" --dev-size "$DEV_SIZE" --rw "$2" --bs "$3" --qd "$4" \
    --flush-every "${5:-0}" --runtime "${RT}s" --quiet --json "$OUT/$1.json" >/dev/null
}
# Each pair (objects workload, its device baseline) runs back to back, ROUNDS times,
# alternating which goes first: this disk's speed drifts by tens of percent within
# minutes, so single runs mean little. The report gives each round's ratio and the
# median.
ROUNDS=${ROUNDS:-3}
pair() { # round tag-suffix obj-args... -- dev-args...
  local round=$1; shift
  local oargs=() dargs=()
  while [ "$1" != "--" ]; do oargs+=("$1"); shift; done; shift
  dargs=("$@")
  if [ $((round % 2)) -eq 1 ]; then obj "${oargs[@]}"; dev "${dargs[@]}"
  else dev "${dargs[@]}"; obj "${oargs[@]}"; fi
}
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS"
  pair "$round" "w4k-qd1-r$round" write 4k 1 4096 -- "d-w4k-qd1-flush-r$round" randwrite 4k 1 1
  pair "$round" "w4k-qd32-r$round" write 4k 32 4096 -- "d-w4k-qd32-r$round" randwrite 4k 32
  pair "$round" "rr4k-qd32-r$round" randread 4k 32 4096 -- "d-rr4k-qd32-r$round" randread 4k 32
  pair "$round" "w4m-qd4-r$round" write 4M 4 64 -- "d-w1m-qd4-r$round" write 1M 4
  $B/sluice-bench net --size 64 --qd 1 --runtime "${RT}s" --quiet --json "$OUT/n-rtt-r$round.json" >/dev/null
done
echo "== null network"
$B/sluice-bench net --size 4M --qd 4 --runtime "${RT}s" --quiet --json "$OUT/n-4m-qd4.json" >/dev/null

python3 - "$OUT" "$ROUNDS" <<'PY'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
r = lambda n: json.load(open(f"{out}/{n}.json"))["results"]
med = statistics.median
print(f"{rounds} rounds; per-round figures, then the median")
qd1 = []
for k in range(1, rounds + 1):
    o, d = r(f"w4k-qd1-r{k}"), r(f"d-w4k-qd1-flush-r{k}")
    base = d["durable_write"]["p50_us"] if d.get("durable_write") else d["p50_us"]
    rtt = r(f"n-rtt-r{k}")["p50_us"]
    qd1.append((o["p50_us"], base, rtt, o["p50_us"] / (base + rtt)))
print("4k write QD1 median: " + ", ".join(f"{a:.0f} us vs {b:.0f}+{c:.0f} us ({x:.2f})" for a, b, c, x in qd1)
      + f"; median ratio {med(x for *_, x in qd1):.2f} (bar <= 1.5)")
for name, devn, key, unit in [("w4k-qd32", "d-w4k-qd32", "iops", "IOPS"), ("rr4k-qd32", "d-rr4k-qd32", "iops", "IOPS"),
                              ("w4m-qd4", "d-w1m-qd4", "bytes_per_sec", "MB/s")]:
    rows = []
    for k in range(1, rounds + 1):
        a, b = r(f"{name}-r{k}"), r(f"{devn}-r{k}")
        sc = 1e6 if unit == "MB/s" else 1
        rows.append((a[key] / sc, b[key] / sc, a[key] / b[key], a.get("osd_cpu_us_per_io", float("nan")), a["p50_us"], a["p99_us"]))
    print(f"{name}: " + ", ".join(f"{a:.0f} vs {b:.0f} {unit} ({x:.2f})" for a, b, x, *_ in rows)
          + f"; median ratio {med(x for _, _, x, *_ in rows):.2f} (bar >= 0.70); OSD CPU/IO median {med(c for *_, c, _, _ in rows):.1f} us"
          + f"; p50 {med(p for *_, p, _ in rows):.0f} us p99 {med(p for *_, p in rows):.0f} us")
n4m = r("n-4m-qd4")
print(f"null network 4 MiB QD4: {n4m['bytes_per_sec']/1e6:.0f} MB/s at {n4m['cpu_us_per_io']:.0f} us CPU per 4 MiB (both ends)")
print(f"reports in {out}")
PY
