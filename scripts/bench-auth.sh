#!/usr/bin/env bash
# What authentication costs on the data path (issue 6's bar, docs/benchmarks.md):
# 4 KiB random reads at QD32 (and 4 KiB writes at QD32) through one local OSD, with
#   none    auth = "none": no handshake, no caps check
#   crc     auth = "cephx", ms_mode = "crc": ticket handshake per connection, caps
#           checked per op, frames checksummed (the default)
#   secure  auth = "cephx", ms_mode = "secure": also AES-GCM on every frame
# The OSD is restarted with each mode's configuration and the modes alternate, ROUNDS
# times (this disk drifts by tens of percent within minutes: single runs mean little).
# Bar: crc within 5% of none for reads.
#
#   usage: scripts/bench-auth.sh [DIR] [RUNTIME_S]  (defaults: /var/tmp/sluice/authbench 10)
#   env:   DEV_SIZE (default 2G), ROUNDS (default 3)
#   needs: python3; builds release binaries. DIR's content is destroyed.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/var/tmp/sluice/authbench}
RT=${2:-10}
DEV_SIZE=${DEV_SIZE:-2G}
ROUNDS=${ROUNDS:-3}
OUT=${OUT:-bench-out/auth-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
cargo build --release -q --bins
B=./target/release
$B/sluice dev down --dir "$DIR/cluster" >/dev/null 2>&1 || true
rm -rf "$DIR"; mkdir -p "$DIR/cluster"
# Written in full first (see bench-objects-vs-device.sh: holes make every sync costly).
dd if=/dev/zero of="$DIR/cluster/osd.0.dev" bs=4M count=$(( $(numfmt --from=iec "$DEV_SIZE") / 4194304 )) oflag=direct status=none
$B/sluice dev up --dir "$DIR/cluster" --mons 1 --osds 1 --device-size "$DEV_SIZE" >/dev/null
trap '$B/sluice dev down --dir "$DIR/cluster" >/dev/null 2>&1 || true' EXIT
CONF="$DIR/cluster/sluice.conf"
cp "$CONF" "$DIR/cephx.conf"
$B/sluice -c "$CONF" pool create bench --size 1 --pg-num 64 >/dev/null

mode() { # none|crc|secure: the configuration every program reads, and an OSD restart
  case $1 in
    none) sed 's/^auth = "cephx"/auth = "none"/' "$DIR/cephx.conf" > "$CONF" ;;
    crc) cp "$DIR/cephx.conf" "$CONF" ;;
    secure) { cat "$DIR/cephx.conf"; echo 'ms_mode = "secure"'; } > "$CONF" ;;
  esac
  $B/sluice -c "$CONF" dev kill osd.0 --dir "$DIR/cluster" >/dev/null
  $B/sluice -c "$CONF" dev start osd.0 --dir "$DIR/cluster" >/dev/null
  for _ in $(seq 1 120); do
    if $B/sluice -c "$CONF" osd dump --format json 2>/dev/null | python3 -c '
import json,sys; m=json.load(sys.stdin); o=[x for x in m["osds"] if x["id"]==0][0]
sys.exit(0 if o["up"] and o.get("up_from",0)>int(sys.argv[1]) else 1)' "$2"; then return; fi
    sleep 0.5
  done
  echo "osd.0 did not come up in mode $1" >&2; exit 1
}
obj() { # tag rw
  $B/sluice-bench objects -c "$CONF" --pool bench --rw "$2" --size 4k --qd 32 \
    --objects 4096 --runtime "${RT}s" --quiet --json "$OUT/$1.json" >/dev/null
}
epoch() { $B/sluice -c "$CONF" osd dump --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["epoch"])'; }
# Objects to read: written once, in crc mode.
mode crc "$(epoch)"
obj prefill write
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS"
  order="none crc secure"
  [ $((round % 2)) -eq 0 ] && order="secure crc none"
  for m in $order; do
    mode "$m" "$(epoch)"
    obj "rr-$m-r$round" randread
    obj "w-$m-r$round" write
  done
done
mode crc "$(epoch)"

python3 - "$OUT" "$ROUNDS" <<'PY'
import json, sys, statistics
out, rounds = sys.argv[1], int(sys.argv[2])
r = lambda n: json.load(open(f"{out}/{n}.json"))["results"]
med = statistics.median
print(f"{rounds} rounds, 4 KiB QD32; per round, then the median")
for rw, label in [("rr", "randread"), ("w", "write")]:
    base = [r(f"{rw}-none-r{k}")["iops"] for k in range(1, rounds + 1)]
    for m in ["none", "crc", "secure"]:
        rows = [r(f"{rw}-{m}-r{k}") for k in range(1, rounds + 1)]
        iops = [x["iops"] for x in rows]
        ratio = [a / b for a, b in zip(iops, base)]
        cpu = [x.get("osd_cpu_us_per_io", float("nan")) for x in rows]
        print(f"{label} {m:6}: " + ", ".join(f"{a:.0f}" for a in iops)
              + f" IOPS; vs none {', '.join(f'{x:.3f}' for x in ratio)} (median {med(ratio):.3f})"
              + f"; OSD CPU/IO median {med(cpu):.1f} us; p50 {med(x['p50_us'] for x in rows):.0f} us")
print(f"reports in {out}")
PY
