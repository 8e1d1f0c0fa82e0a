#!/usr/bin/env bash
# Host driver of the VM test: boots a QEMU TCG guest (q35 + virtual Intel IOMMU) with two
# emulated NVMe controllers, and runs the userspace NVMe-over-VFIO driver against them.
#
#   controller A: serial sluiceA, PCI 00:04.0, namespaces 1 (64 MiB) and 2 (256 MiB)
#   controller B: serial sluiceB, PCI 00:05.0, namespace 1 (64 MiB)
#
# Boot 1 (sluice.phase=write): conformance on A/1 and A/2, bench on B/1, mkfs on A/2, then
#   powercut-write on A/2, which prints "ACK <n>" lines. Once the first ACK shows up, we wait
#   ACK_GRACE seconds (or until ACK reaches ACK_MAX) and kill -9 QEMU: a hard power cut.
# Boot 2 (sluice.phase=verify sluice.acked=<largest n>) on the same images: fsck, then
#   powercut-verify checks that every acknowledged write survived.
#
# Prints "VM-TEST PASS" and exits 0, or "VM-TEST FAIL: <reasons>" and exits 1.
#
# Environment:
#   VM_BINS        dir with the static test binary sluice-vm-test
#                  (default target/x86_64-unknown-linux-gnu/release)
#   VM_TOOLS       dir with sluice-osd and sluice-bench (default target/release); they may
#                  be dynamically linked: their shared libraries go into the initramfs
#   VM_WORK        cache and work dir (default target/vm-test): kernel, initramfs, disk
#                  images, serial logs boot1-write.log / boot2-verify.log
#   VM_MEM         guest RAM (default 1536M)
#   BOOT1_TIMEOUT  seconds until the first ACK (default 240)
#   BOOT2_TIMEOUT  seconds for the verify boot (default 180)
#   ACK_GRACE      seconds to keep running after the first ACK (default 3)
#   ACK_MAX        cut power at once when ACK reaches this (default 2000)
#   VM_QUIET=1     do not stream the guest console to stdout (the logs are still written)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/../.."

VM_WORK=${VM_WORK:-target/vm-test}
VM_BINS=${VM_BINS:-target/x86_64-unknown-linux-gnu/release}
VM_TOOLS=${VM_TOOLS:-target/release}
VM_MEM=${VM_MEM:-1536M}
BOOT1_TIMEOUT=${BOOT1_TIMEOUT:-240}
BOOT2_TIMEOUT=${BOOT2_TIMEOUT:-180}
ACK_GRACE=${ACK_GRACE:-3}
ACK_MAX=${ACK_MAX:-2000}
VM_QUIET=${VM_QUIET:-0}
TEST_BIN=sluice-vm-test
TOOLS="sluice-osd sluice-bench"
# Fixed PCI slots for the controllers (guest-init.sh finds them by serial, these are its
# fallback and keep the addresses stable across runs).
SLOT_A=04; SLOT_B=05
ADDR_A=0000:00:$SLOT_A.0; ADDR_B=0000:00:$SLOT_B.0

say() { echo "[vm-test] $*"; }
die() { echo "VM-TEST FAIL: $*"; exit 1; }

# ---- 0. host prerequisites (packages, guest kernel) -----------------------------------------
"$here/setup.sh"
mkdir -p "$VM_WORK"
VM_WORK=$(cd "$VM_WORK" && pwd)
KVER=$(cat "$VM_WORK/kver")
KROOT=$VM_WORK/kroot
PATH=$PATH:/sbin:/usr/sbin

# ---- 1. initramfs ----------------------------------------------------------------------------
# Check the guest binaries first. The test binary is static; the tools may be dynamic
# (their shared libraries are copied in below).
[ -d "$VM_BINS" ] || die "VM_BINS=$VM_BINS is not a directory (build the guest binaries first)"
for f in "$VM_BINS/$TEST_BIN" $(for b in $TOOLS; do echo "$VM_TOOLS/$b"; done); do
  [ -f "$f" ] || die "guest binary $f is missing"
  [ -x "$f" ] || die "guest binary $f is not executable"
done
f=$VM_BINS/$TEST_BIN
if command -v readelf >/dev/null && readelf -l "$f" 2>/dev/null | grep -q 'Requesting program interpreter'; then
  die "the test binary $f is dynamically linked (build with RUSTFLAGS='-C target-feature=+crt-static')"
fi

build_initramfs() {
  local ir=$VM_WORK/initramfs m p rel
  rm -rf "$ir"
  mkdir -p "$ir"/{bin,sbin,dev,proc,sys,tmp,mnt,lib/modules/"$KVER"}
  # busybox-static provides /bin/busybox; every applet becomes a symlink.
  cp /bin/busybox "$ir/bin/busybox"
  for a in $("$ir/bin/busybox" --list); do
    [ -e "$ir/bin/$a" ] || ln -s busybox "$ir/bin/$a"
  done
  # The modules and everything they depend on, as modprobe resolves them in the kernel tree.
  for m in nvme vfio vfio-pci vfio_iommu_type1; do
    modprobe -d "$KROOT" -S "$KVER" --show-depends "$m" | awk '/^insmod/{print $2}'
  done | sort -u | while read -r p; do
    rel=${p#"$KROOT"/}
    mkdir -p "$ir/$(dirname "$rel")"
    cp "$p" "$ir/$rel"
  done
  cp "$KROOT/lib/modules/$KVER"/modules.{order,builtin,builtin.modinfo} "$ir/lib/modules/$KVER/"
  depmod -b "$ir" "$KVER"
  # Test scripts and binaries.
  cp "$here/guest-init.sh" "$ir/init"
  cp "$here/guest-test.sh" "$ir/bin/guest-test.sh"
  # Without debug info: a smaller initramfs unpacks faster in the guest.
  strip --strip-debug -o "$ir/bin/$TEST_BIN" "$VM_BINS/$TEST_BIN"
  for b in $TOOLS; do strip --strip-debug -o "$ir/bin/$b" "$VM_TOOLS/$b"; done
  # The tools' shared libraries (and the dynamic loader) at the paths they are linked
  # against: the guest runs the host's own glibc.
  for b in $TOOLS; do
    ldd "$VM_TOOLS/$b" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'
  done | sort -u | while read -r lib; do
    mkdir -p "$ir$(dirname "$lib")"
    cp -L "$lib" "$ir$lib"
  done
  chmod +x "$ir/init" "$ir/bin/"*
  (cd "$ir" && find . | cpio -o -H newc --quiet | gzip -1) > "$VM_WORK/initramfs.cpio.gz"
  say "initramfs $(du -h "$VM_WORK/initramfs.cpio.gz" | cut -f1): modules" \
      "$(find "$ir" -name '*.ko*' -printf '%f ' | sort)"
}
build_initramfs

# ---- 2. fresh disk images (sparse) ---------------------------------------------------------
rm -f "$VM_WORK"/{a1,a2,b1}.img
truncate -s 64M "$VM_WORK/a1.img"
truncate -s 256M "$VM_WORK/a2.img"
truncate -s 64M "$VM_WORK/b1.img"

# ---- 3. QEMU -------------------------------------------------------------------------------
# QEMU 7.2's nvme device has no `mqes` property (MQES is fixed at 2048); newer ones do, and
# then a small value makes the driver's queues wrap quickly.
NVME_OPTS=""
if qemu-system-x86_64 -device nvme,help 2>/dev/null | grep -q '^ *mqes='; then
  NVME_OPTS=",mqes=16"
fi

QEMU_PID=""
trap '[ -n "$QEMU_PID" ] && kill -9 "$QEMU_PID" 2>/dev/null; true' EXIT

# start_qemu <serial log> <extra kernel cmdline>: sets QEMU_PID
start_qemu() {
  local log=$1 append=$2
  : > "$log"
  # -accel tcg always (KVM hangs on this machine). TCG + intel-iommu per the recipe: no
  # kernel-irqchip=split. -nodefaults: no NIC/VGA (no iPXE ROM, faster boot).
  qemu-system-x86_64 \
    -accel tcg -cpu max -machine q35 \
    -device intel-iommu,intremap=on,caching-mode=on \
    -m "$VM_MEM" -smp 2 -nodefaults -display none -no-reboot \
    -serial "file:$log" \
    -kernel "$KROOT/boot/vmlinuz-$KVER" -initrd "$VM_WORK/initramfs.cpio.gz" \
    -append "console=ttyS0 panic=-1 quiet loglevel=4 intel_iommu=on iommu=pt sluice.nvme_a=$ADDR_A sluice.nvme_b=$ADDR_B $append" \
    -drive "file=$VM_WORK/a1.img,if=none,id=a1,format=raw" \
    -drive "file=$VM_WORK/a2.img,if=none,id=a2,format=raw" \
    -drive "file=$VM_WORK/b1.img,if=none,id=b1,format=raw" \
    -device "nvme,id=nvmeA,serial=sluiceA,addr=$SLOT_A.0$NVME_OPTS" \
    -device nvme-ns,drive=a1,bus=nvmeA,nsid=1 \
    -device nvme-ns,drive=a2,bus=nvmeA,nsid=2,logical_block_size=4096,physical_block_size=4096 \
    -device "nvme,id=nvmeB,serial=sluiceB,addr=$SLOT_B.0$NVME_OPTS" \
    -device nvme-ns,drive=b1,bus=nvmeB,nsid=1 \
    </dev/null >"$log.qemu-stderr" 2>&1 &
  QEMU_PID=$!
}

# The serial log with CRs and terminal escapes removed.
clean() { tr -d '\r' | sed -e 's/\x1b\[[0-9;?]*[A-Za-z]//g' -e 's/\x1b[c()][0-9A-Za-z]\?//g'; }
# Only lines the guest finished (ending in a newline): a line cut off by the kill is ignored.
complete_lines() { head -n "$(wc -l < "$1")" "$1" | clean; }
max_ack() { complete_lines "$1" | sed -n 's/^ACK \([0-9][0-9]*\)$/\1/p' | sort -n | tail -n1; }
now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }

# Stream the log's new complete lines to stdout, prefixed, without the (many) ACK lines.
STREAMED=0
stream() {
  local log=$1 tag=$2 n
  n=$(wc -l < "$log")
  if [ "$VM_QUIET" != 1 ] && [ "$n" -gt "$STREAMED" ]; then
    sed -n "$((STREAMED + 1)),${n}p" "$log" | clean | grep -av '^ACK [0-9]*$' |
      sed "s/^/[$tag] /" || true
  fi
  STREAMED=$n
}

# boot <tag> <mode: write|verify> <timeout s> <kernel cmdline>
# Sets BOOT_END (killed|exited|timeout), BOOT_SECS, and for write: ACKED.
boot() {
  local tag=$1 mode=$2 timeout=$3 append=$4
  local log=$VM_WORK/$tag.serial t0 t first_ack="" a
  STREAMED=0; ACKED=""; BOOT_END=""
  say "$tag: booting ($append), timeout ${timeout}s"
  t0=$(now_ms)
  start_qemu "$log" "$append"
  while :; do
    sleep 0.25
    stream "$log" "$tag"
    t=$(now_ms)
    if ! kill -0 "$QEMU_PID" 2>/dev/null; then BOOT_END=exited; break; fi
    if [ "$mode" = write ]; then
      a=$(max_ack "$log")
      if [ -n "$a" ] && [ -z "$first_ack" ]; then
        first_ack=$t
        say "$tag: first ACK ($a) after $(((t - t0) / 1000))s"
      fi
      if [ -n "$first_ack" ] && { [ $((t - first_ack)) -ge $((ACK_GRACE * 1000)) ] || [ "$a" -ge "$ACK_MAX" ]; }; then
        kill -9 "$QEMU_PID"   # the power cut
        BOOT_END=killed; break
      fi
    fi
    if [ $((t - t0)) -ge $((timeout * 1000)) ] && [ -z "$first_ack" ]; then
      kill -9 "$QEMU_PID"
      BOOT_END=timeout; break
    fi
  done
  wait "$QEMU_PID" 2>/dev/null || true
  QEMU_PID=""
  BOOT_SECS=$(( ($(now_ms) - t0) / 1000 ))
  stream "$log" "$tag"
  # Keep a cleaned copy next to the raw serial log.
  clean < "$log" > "$VM_WORK/$tag.log"
  if [ "$mode" = write ]; then
    ACKED=$(max_ack "$log")
    say "$tag: $(grep -ac '^ACK [0-9]*$' "$VM_WORK/$tag.log" || true) ACK lines, largest ${ACKED:-none}"
  fi
  if [ -s "$log.qemu-stderr" ] && grep -qv 'warning: TCG doesn' "$log.qemu-stderr"; then
    say "$tag: qemu stderr:"; grep -v 'warning: TCG doesn' "$log.qemu-stderr" | sed "s/^/[$tag qemu] /"
  fi
  say "$tag: ended ($BOOT_END) after ${BOOT_SECS}s; log $VM_WORK/$tag.log"
}

# ---- 4. the two boots and the verdict --------------------------------------------------------
reasons=()
fail() { reasons+=("$*"); }
# check_log <log> <steps that must have passed...>
check_log() {
  local log=$1 tag s; shift
  tag=$(basename "$log" .log)
  grep -aq '^FAIL' "$log" && fail "$tag: $(grep -a '^FAIL' "$log" | head -n3 | paste -sd'|')"
  grep -aq 'Kernel panic' "$log" && fail "$tag: guest kernel panic"
  for s in "$@"; do
    grep -aqx "PASS step $s" "$log" || fail "$tag: no 'PASS step $s'"
  done
}

t_start=$(now_ms)
boot boot1-write write "$BOOT1_TIMEOUT" "sluice.phase=write"
B1_SECS=$BOOT_SECS
ACKED1=$ACKED
log1=$VM_WORK/boot1-write.log
check_log "$log1" conformance-a1 conformance-a2 bench-randwrite bench-randread mkfs
case $BOOT_END in
  timeout) fail "boot1: no ACK within ${BOOT1_TIMEOUT}s";;
  exited)  fail "boot1: guest stopped before the power cut ($(grep -a '^GUEST: phase' "$log1" | tail -n1))";;
esac
grep -aqx 'STEP powercut-write' "$log1" || fail "boot1: powercut-write never started"
[ -n "$ACKED" ] || fail "boot1: no ACK line"

B2_SECS=-
if [ ${#reasons[@]} -eq 0 ]; then
  boot boot2-verify verify "$BOOT2_TIMEOUT" "sluice.phase=verify sluice.acked=$ACKED1"
  B2_SECS=$BOOT_SECS
  log2=$VM_WORK/boot2-verify.log
  check_log "$log2" fsck powercut-verify osd-run
  [ "$BOOT_END" = timeout ] && fail "boot2: timed out after ${BOOT2_TIMEOUT}s"
  grep -aqx 'GUEST: phase verify rc=0' "$log2" ||
    fail "boot2: no 'GUEST: phase verify rc=0' ($(grep -a '^GUEST: phase' "$log2" | tail -n1))"
else
  say "boot2 skipped: boot1 failed"
fi

say "summary: boot1 ${B1_SECS}s (acked ${ACKED1:-none}), boot2 ${B2_SECS}s, total $(( ($(now_ms) - t_start) / 1000 ))s"
if [ ${#reasons[@]} -eq 0 ]; then
  echo "VM-TEST PASS"
  exit 0
fi
msg=$(printf '%s; ' "${reasons[@]}")
echo "VM-TEST FAIL: ${msg%; }"
exit 1
