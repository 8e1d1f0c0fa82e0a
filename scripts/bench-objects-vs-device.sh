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
#   env:   DEV_SIZE (default 4G)
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
echo "== objects"
obj w4k-qd1 write 4k 1 4096
obj w4k-qd32 write 4k 32 4096
obj rr4k-qd32 randread 4k 32 4096
obj w4m-qd4 write 4M 4 64
echo "== device"
dev d-w4k-qd1-flush randwrite 4k 1 1
dev d-w4k-qd32 randwrite 4k 32
dev d-rr4k-qd32 randread 4k 32
dev d-w1m-qd4 write 1M 4
echo "== null network"
$B/sluice-bench net --size 64 --qd 1 --runtime "${RT}s" --quiet --json "$OUT/n-rtt.json" >/dev/null
$B/sluice-bench net --size 4M --qd 4 --runtime "${RT}s" --quiet --json "$OUT/n-4m-qd4.json" >/dev/null

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
r = lambda n: json.load(open(f"{out}/{n}.json"))["results"]
rtt_ms = r("n-rtt")["p50_us"] / 1000
rows = []
qd1, dqd1 = r("w4k-qd1"), r("d-w4k-qd1-flush")
base = dqd1["durable_write"]["p50_us"] if dqd1.get("durable_write") else dqd1["p50_us"]
limit = 1.5 * (base + rtt_ms * 1000)
print(f"4k write QD1: median {qd1['p50_us']:.1f} us; device write+flush median {base:.1f} us + loopback RTT {rtt_ms*1000:.1f} us; ratio {qd1['p50_us']/(base + rtt_ms*1000):.2f} (bar <= 1.5) OSD CPU {qd1.get('osd_cpu_us_per_io', float('nan')):.1f} us/io")
for name, dev, bar, key in [("w4k-qd32", "d-w4k-qd32", 0.70, "iops"), ("rr4k-qd32", "d-rr4k-qd32", 0.70, "iops"), ("w4m-qd4", "d-w1m-qd4", 0.70, "bytes_per_sec")]:
    a, b = r(name), r(dev)
    print(f"{name}: {a[key]:.0f} vs device {b[key]:.0f} {key}: ratio {a[key]/b[key]:.2f} (bar >= {bar}); p50 {a['p50_us']:.0f} us p99 {a['p99_us']:.0f} us; OSD CPU {a.get('osd_cpu_us_per_io', float('nan')):.1f} us/io")
n4m = r("n-4m-qd4")
print(f"null network 4 MiB QD4: {n4m['bytes_per_sec']/1e6:.0f} MB/s at {n4m['cpu_us_per_io']:.0f} us CPU per 4 MiB (both ends); objects 4 MiB reach {r('w4m-qd4')['bytes_per_sec']/n4m['bytes_per_sec']:.2f} of it")
print(f"reports in {out}")
PY
