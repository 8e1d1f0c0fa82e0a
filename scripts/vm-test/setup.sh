#!/usr/bin/env bash
# Prepares everything the VM test needs on the host, idempotently:
#   - Debian packages: qemu-system-x86, busybox-static, cpio, kmod (installed only if missing)
#   - a Debian 6.1 guest kernel + its modules, unpacked into $VM_WORK/kroot
#   - $VM_WORK/kver: the kernel version string (e.g. 6.1.0-57-amd64)
#
# The kernel package name is looked up each time the cache is empty, never hard-coded: the
# Debian archive moves to a new ABI number (6.1.0-N) now and then and drops the old one.
#
#   VM_WORK   cache/work directory (default target/vm-test, relative to the repo root)
set -euo pipefail
cd "$(dirname "$0")/../.."
VM_WORK=${VM_WORK:-target/vm-test}
mkdir -p "$VM_WORK"
VM_WORK=$(cd "$VM_WORK" && pwd)

log() { echo "vm-test setup: $*"; }

# ---- 1. host packages ------------------------------------------------------------------
need=()
for p in qemu-system-x86 busybox-static cpio kmod; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
PATH=$PATH:/sbin:/usr/sbin

# ---- 2. guest kernel -------------------------------------------------------------------
kroot=$VM_WORK/kroot
if [ -s "$VM_WORK/kver" ] && [ -f "$kroot/boot/vmlinuz-$(cat "$VM_WORK/kver")" ] &&
   [ -f "$kroot/lib/modules/$(cat "$VM_WORK/kver")/modules.dep" ]; then
  log "kernel $(cat "$VM_WORK/kver") already in $kroot"
  exit 0
fi

# Which linux-image-6.1.0-N-amd64 is current? Ask the metapackage first; if it does not point
# at a 6.1 kernel (e.g. backports pinned), take the highest N the package lists know.
find_kernel_pkg() {
  local p
  p=$(apt-cache depends linux-image-amd64 2>/dev/null |
      awk '/Depends:/{print $2}' | grep -E '^linux-image-6\.1\.0-[0-9]+-amd64$' | head -n1 || true)
  if [ -z "$p" ]; then
    p=$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' | awk '{print $1}' |
        sort -V | tail -n1)
  fi
  echo "$p"
}
pkg=$(find_kernel_pkg)
if [ -z "$pkg" ]; then
  log "no kernel package in the lists yet; running apt-get update"
  apt-get update -qq
  pkg=$(find_kernel_pkg)
fi
[ -n "$pkg" ] || { log "ERROR: cannot find a linux-image-6.1.0-N-amd64 package"; exit 1; }
kver=${pkg#linux-image-}
log "guest kernel package: $pkg"

# Download into a scratch dir that apt's unprivileged _apt user can write to (quiets a warning).
dl=$(mktemp -d /tmp/sluice-vm-kernel.XXXXXX)
chmod 0777 "$dl"
trap 'rm -rf "$dl"' EXIT
rm -rf "$kroot"
mkdir -p "$kroot"
# apt-get download writes into the current directory; if the lists are stale the archive may
# no longer have this version, so retry once after an update.
if ! (cd "$dl" && apt-get download -qq "$pkg"); then
  apt-get update -qq
  pkg=$(find_kernel_pkg); kver=${pkg#linux-image-}
  (cd "$dl" && apt-get download -qq "$pkg")
fi
dpkg -x "$dl"/"$pkg"_*.deb "$kroot"
rm -rf "$dl"
[ -f "$kroot/boot/vmlinuz-$kver" ] || { log "ERROR: $pkg has no boot/vmlinuz-$kver"; exit 1; }
depmod -b "$kroot" "$kver"
echo "$kver" > "$VM_WORK/kver"
log "kernel $kver unpacked into $kroot"
