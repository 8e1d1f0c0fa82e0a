#!/usr/bin/env bash
# What authentication costs on the data path (issue 6's bar, docs/benchmarks.md):
# 4 KiB random reads at QD32 (and 4 KiB writes at QD32) through one local OSD, with
#   none    auth = "none": no handshake, no caps check
#   crc     auth = "cephx", ms_mode = "crc": ticket handshake per connection, caps
#           checked per op, frames checksummed (the default)
#   secure  auth = "cephx", ms_mode = "secure": also AES-GCM on every frame
# The modes alternate, ROUNDS times (this disk drifts by tens of percent within minutes:
# single runs mean little); each round's ratio is against that round's none.
# Bar: crc within 5% of none for reads.
#
#   usage: scripts/bench-auth.sh [DIR] [RUNTIME_S]  (defaults: /var/tmp/sluice/authbench 10)
#   env:   DEV_SIZE (default 2G), ROUNDS (default 3), RAM=1 (device files on tmpfs,
#          `sluice-osd run --buffered`: the device out of the measurement)
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
# Two clusters on the same file system, both up, one OSD each (only one does I/O at a
# time; the idle one parks): `none` made with `sluice dev up --auth none` (monitors
# without keys: a cluster with keys serves only signed requests, so auth cannot be
# turned off by a client's configuration alone), `cephx` for crc and secure (its OSD
# restarted with the configuration's ms_mode when the mode changes).
for c in none cephx; do $B/sluice dev down --dir "$DIR/$c" >/dev/null 2>&1 || true; done
rm -rf "$DIR"
trap 'for c in none cephx; do $B/sluice dev down --dir "$DIR/$c" >/dev/null 2>&1 || true; done' EXIT
for c in none cephx; do
  mkdir -p "$DIR/$c"
  # Written in full first (see bench-objects-vs-device.sh: holes make every sync costly).
  dd if=/dev/zero of="$DIR/$c/osd.0.dev" bs=4M count=$(( $(numfmt --from=iec "$DEV_SIZE") / 4194304 )) oflag=direct status=none
  $B/sluice dev up --dir "$DIR/$c" --mons 1 --osds 1 --device-size "$DEV_SIZE" --auth "$c" >/dev/null
  $B/sluice -c "$DIR/$c/sluice.conf" pool create bench --size 1 --pg-num 64 >/dev/null
done
if [ "${RAM:-0}" = 1 ]; then
  # The device out of the measurement: each OSD's device file moves to tmpfs, opened
  # without O_DIRECT (`sluice-osd run --buffered`), keeping its own keyring.
  for c in none cephx; do
    $B/sluice dev down --dir "$DIR/$c" >/dev/null
    shm=/dev/shm/sluice-authbench-$c.dev
    cp --sparse=always "$DIR/$c/osd.0.dev" "$shm"
    rm "$DIR/$c/osd.0.dev"
    python3 - "$DIR/$c/dev.json" "$shm" "$DIR/$c/osd.0.dev.keyring" <<'PY'
import json, sys
path, shm, keyring = sys.argv[1:]
st = json.load(open(path))
for d in st["daemons"]:
    if d["name"] == "osd.0":
        a = d["argv"]
        a[a.index("--dev") + 1] = shm
        a += ["--buffered", "--keyring", keyring]
json.dump(st, open(path, "w"), indent=2)
PY
    $B/sluice dev up --dir "$DIR/$c" >/dev/null
  done
  trap 'for c in none cephx; do $B/sluice dev down --dir "$DIR/$c" >/dev/null 2>&1 || true; rm -f /dev/shm/sluice-authbench-$c.dev; done' EXIT
fi
CEPHX="$DIR/cephx/sluice.conf"
cp "$CEPHX" "$DIR/crc.conf"
{ cat "$DIR/crc.conf"; echo 'ms_mode = "secure"'; } > "$DIR/secure.conf"
osd_mode=crc
conf_of() { case $1 in none) echo "$DIR/none/sluice.conf" ;; *) echo "$CEPHX" ;; esac; }
mode() { # none|crc|secure: the cephx cluster's OSD restarted when its ms_mode changes
  [ "$1" = none ] || [ "$1" = "$osd_mode" ] && return 0
  cp "$DIR/$1.conf" "$CEPHX"
  local before
  before=$($B/sluice -c "$CEPHX" osd dump --format json | python3 -c 'import json,sys; print(json.load(sys.stdin)["epoch"])')
  $B/sluice -c "$CEPHX" dev kill osd.0 --dir "$DIR/cephx" >/dev/null
  $B/sluice -c "$CEPHX" dev start osd.0 --dir "$DIR/cephx" >/dev/null
  for _ in $(seq 1 120); do
    if $B/sluice -c "$CEPHX" osd dump --format json 2>/dev/null | python3 -c '
import json,sys; m=json.load(sys.stdin); o=[x for x in m["osds"] if x["id"]==0][0]
sys.exit(0 if o["up"] and o.get("up_from",0)>int(sys.argv[1]) else 1)' "$before"; then osd_mode=$1; return 0; fi
    sleep 0.5
  done
  echo "osd.0 did not come up in mode $1" >&2; exit 1
}
obj() { # tag rw mode
  $B/sluice-bench objects -c "$(conf_of "$3")" --pool bench --rw "$2" --size 4k --qd 32 \
    --objects 4096 --runtime "${RT}s" --quiet --json "$OUT/$1.json" >/dev/null
}
# Objects to read, in both clusters.
obj prefill-none write none
obj prefill-cephx write crc
for round in $(seq 1 "$ROUNDS"); do
  echo "== round $round of $ROUNDS"
  order="none crc secure"
  [ $((round % 2)) -eq 0 ] && order="secure crc none"
  for m in $order; do
    mode "$m"
    obj "rr-$m-r$round" randread "$m"
    obj "w-$m-r$round" write "$m"
  done
done
mode crc

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
