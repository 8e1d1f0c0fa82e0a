#!/usr/bin/env bash
# CI entry for the VM test (called from .ci/run): builds the guest binaries statically, then
# boots the QEMU TCG guest and runs the userspace NVMe-over-VFIO tests (scripts/vm-test/run.sh).
# Prints "VM-TEST PASS" or "VM-TEST FAIL: <reason>"; exit status 0 / 1.
set -euo pipefail
cd "$(dirname "$0")/../.."

echo "== vm-test: static guest binaries"
# The initramfs has no libc: link glibc statically. An explicit --target keeps RUSTFLAGS away
# from build scripts and proc macros and puts the output in target/x86_64-unknown-linux-gnu/.
# sluice-osd (in sluice-dataplane) and sluice-bench have the `vfio` feature on by default.
RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target x86_64-unknown-linux-gnu \
  -p sluice-vmtest -p sluice-dataplane -p sluice-bench --bins

echo "== vm-test: QEMU TCG guest with two emulated NVMe controllers over VFIO"
VM_BINS=target/x86_64-unknown-linux-gnu/release ./scripts/vm-test/run.sh
