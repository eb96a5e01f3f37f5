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
echo "== cargo test"
cargo test --workspace --locked
