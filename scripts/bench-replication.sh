#!/usr/bin/env bash
# Measures replication's cost (issue 7's bar, docs/benchmarks.md): 4 KiB writes at QD32
# to a pool of size 3 (min_size 2) on three local OSDs against a pool of size 1 on the
# same cluster, back to back in the same run, ROUNDS times alternating which goes first
# (this disk's speed drifts within minutes). Reports each round's IOPS, the ratio size 3
# / size 1 and the median (bar >= 0.60), and the OSDs' CPU per write (all sluice-osd
# processes on this machine: three for size 3, whose writes each cost three stores).
#
#   usage: scripts/bench-replication.sh [DIR] [RUNTIME_S]  (defaults: /var/tmp/sluice/repbench 10)
#   env:   DEV_SIZE (default 2G per OSD), ROUNDS (default 3), QD (default 32)
#   needs: python3; builds release binaries. DIR's content is destroyed.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/var/tmp/sluice/repbench}
RT=${2:-10}
DEV_SIZE=${DEV_SIZE:-2G}
ROUNDS=${ROUNDS:-3}
QD=${QD:-32}
OUT=${OUT:-bench-out/replication-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
cargo build --release -q --bins
B=./target/release
$B/sluice dev down --dir "$DIR/cluster" >/dev/null 2>&1 || true
rm -rf "$DIR"; mkdir -p "$DIR/cluster"
# Device files written in full first (see bench-objects-vs-device.sh: holes make every
# fdatasync commit the file system's journal).
for i in 0 1 2; do
  dd if=/dev/zero of="$DIR/cluster/osd.$i.dev" bs=4M count=$(( $(numfmt --from=iec "$DEV_SIZE") / 4194304 )) oflag=direct status=none
done
$B/sluice dev up --dir "$DIR/cluster" --mons 1 --osds 3 --device-size "$DEV_SIZE" >/dev/null
trap '$B/sluice dev down --dir "$DIR/cluster" >/dev/null 2>&1 || true' EXIT
CONF="$DIR/cluster/sluice.conf"
$B/sluice -c "$CONF" pool create one --size 1 --pg-num 64 >/dev/null
$B/sluice -c "$CONF" pool create three --size 3 --min-size 2 --pg-num 64 >/dev/null

obj() { # tag pool
  $B/sluice-bench objects -c "$CONF" --pool "$2" --rw write --size 4k --qd "$QD" \
    --objects 4096 --runtime "${RT}s" --quiet --json "$OUT/$1.json" | grep -E 'OSD CPU' || true
}
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS"
  if [ $((round % 2)) -eq 1 ]; then obj "one-r$round" one; obj "three-r$round" three
  else obj "three-r$round" three; obj "one-r$round" one; fi
done

python3 - "$OUT" "$ROUNDS" "$QD" <<'PY'
import json, sys, statistics
out, rounds, qd = sys.argv[1], int(sys.argv[2]), sys.argv[3]
r = lambda n: json.load(open(f"{out}/{n}.json"))["results"]
rows = []
for k in range(1, rounds + 1):
    a, b = r(f"three-r{k}"), r(f"one-r{k}")
    rows.append((a["iops"], b["iops"], a["iops"] / b["iops"], a.get("osd_cpu_us_per_io", float("nan")),
                 b.get("osd_cpu_us_per_io", float("nan")), a["p50_us"], a["p99_us"]))
med = statistics.median
print(f"4k write QD{qd}, size 3 vs size 1: " + ", ".join(f"{a:.0f} vs {b:.0f} IOPS ({x:.2f})" for a, b, x, *_ in rows)
      + f"; median ratio {med(x for _, _, x, *_ in rows):.2f} (bar >= 0.60)")
print(f"OSD CPU per write (all OSDs): size 3 {med(c for *_, c, _, _, _ in rows):.1f} us, size 1 {med(c for *_, c, _, _ in rows):.1f} us;"
      f" size 3 p50 {med(p for *_, p, _ in rows):.0f} us p99 {med(p for *_, p in rows):.0f} us")
print(f"reports in {out}")
PY
