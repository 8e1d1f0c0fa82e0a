#!/usr/bin/env bash
# CI entry for the VM test (called from .ci/run): builds the guest binaries statically, then
# boots the QEMU TCG guest and runs the userspace NVMe-over-VFIO tests (scripts/vm-test/run.sh).
# Prints "VM-TEST PASS" or "VM-TEST FAIL: <reason>"; exit status 0 / 1.
set -euo pipefail
cd "$(dirname "$0")/../.."

echo "== vm-test: the static test binary (sluice-vm-test)"
# Linked with glibc statically. An explicit --target keeps RUSTFLAGS away from build scripts
# and proc macros and puts the output in target/x86_64-unknown-linux-gnu/.
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu \
  -p sluice-vmtest

echo "== vm-test: the tools (sluice-osd, sluice-bench: the release build, vfio on by default)"
# The same command as .ci/run's release build, so nothing is rebuilt there; run.sh copies
# the tools' shared libraries into the guest.
cargo build --release --bins

echo "== vm-test: QEMU TCG guest with two emulated NVMe controllers over VFIO"
VM_BINS=target/x86_64-unknown-linux-gnu/release VM_TOOLS=target/release ./scripts/vm-test/run.sh
