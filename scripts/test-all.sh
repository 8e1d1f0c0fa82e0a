#!/usr/bin/env bash
# Runs every test of Sluice that needs no VM: the workspace's cargo tests, then the
# loom model checks of the lock-free code (a separate build with --cfg loom).
#
#   SLUICE_LOOM_PREEMPTIONS  preemption bound for loom (default 3; unset bound = exhaustive)
#   SLUICE_SKIP_LOOM=1       skip the loom step
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== cargo test --workspace"
cargo test --workspace

if [ "${SLUICE_SKIP_LOOM:-0}" != 1 ]; then
  echo "== loom model checks (dataplane rings and parking)"
  RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
    LOOM_MAX_PREEMPTIONS="${SLUICE_LOOM_PREEMPTIONS:-3}" \
    cargo test -p sluice-dataplane --lib --release loom
fi
echo "== all tests passed"
