#!/usr/bin/env bash
# Fuzzes the wire decoders (net/fuzz: frame_decode, auth_handshake) with cargo-fuzz on
# stable Rust (no sanitizer; libFuzzer's coverage guidance still works). Installs
# cargo-fuzz if it is missing.
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]   (default 60 s each, both targets)
set -euo pipefail
cd "$(dirname "$0")/../net"
secs="${1:-60}"
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(frame_decode auth_handshake)
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi
for t in "${targets[@]}"; do
  mkdir -p "fuzz/corpus/$t"
  cargo fuzz run --sanitizer none "$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -max_len=4096
done
