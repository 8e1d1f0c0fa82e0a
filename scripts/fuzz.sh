#!/usr/bin/env bash
# Fuzzes the wire decoder (net/fuzz, target frame_decode) with cargo-fuzz on stable Rust
# (no sanitizer; libFuzzer's coverage guidance still works). Installs cargo-fuzz if it is
# missing. Usage: scripts/fuzz.sh [SECONDS]   (default 60)
set -euo pipefail
cd "$(dirname "$0")/../net"
secs="${1:-60}"
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
mkdir -p fuzz/corpus/frame_decode
cargo fuzz run --sanitizer none frame_decode fuzz/corpus/frame_decode -- \
  -max_total_time="$secs" -max_len=4096
