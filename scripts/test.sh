#!/usr/bin/env bash
# Installs what is missing, then runs every check and test tidemark has:
# formatting, clippy, and the whole workspace's tests (unit, model-based,
# corruption, crash). Under CI=true the randomised tests run more seeds.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

if [ "${CI:-}" = "true" ]; then
  export TIDEMARK_SEEDS="${TIDEMARK_SEEDS:-64}"
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo build (the tidemark binary the end-to-end tests start)"
cargo build --workspace --bins --locked
echo "== cargo test"
log=$(mktemp)
# Tests that cannot run here (a kernel feature this machine lacks) say so
# in this file; a skipped test is counted apart, never as a pass.
export TIDEMARK_SKIP_LOG
TIDEMARK_SKIP_LOG=$(mktemp)
trap 'rm -f "$log" "$TIDEMARK_SKIP_LOG"' EXIT
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
if [ -s "$TIDEMARK_SKIP_LOG" ]; then
  echo "== skipped (they passed trivially; what this machine lacks):"
  sort -u "$TIDEMARK_SKIP_LOG" | sed 's/^/  /'
fi
# One closing line for the whole suite (cargo prints one per test binary,
# and the last of them is usually an empty doc-test run).
skipped=$(sort -u "$TIDEMARK_SKIP_LOG" | wc -l)
awk -v skipped="$skipped" '/^test result:/ { passed += $4; failed += $6 } END { printf "tidemark: %d passed (%d of them skipped), %d failed\n", passed, skipped, failed }' "$log"
