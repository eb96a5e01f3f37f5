#!/usr/bin/env bash
# M1 — resident memory under a sustained overload with a bounded memory
# cache (see docs/performance.md). Async writes of 1 MiB arrive far faster
# than a deliberately slowed journal can take them; the last line compares
# the process's peak resident set with cache + 64 MiB.
#
#   bash bench/m1.sh [DIR] [CACHE_MIB] [SECONDS] [memory|file|both]
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${TIDEMARK_BENCH_DIR:-/var/tmp}}
CACHE_MIB=${2:-128}
SECONDS_=${3:-10}
TIERS=${4:-both}
if [ -z "${CARGO_TARGET_DIR:-}" ] && [ -d "$HOME/.cache/tidemark-target" ]; then
  export CARGO_TARGET_DIR="$HOME/.cache/tidemark-target"
fi
cargo build -q -p tidemark-bench --bin memory-overload
work=$(mktemp -d "$DIR/tidemark-m1.XXXXXX")
trap 'rm -rf "$work"' EXIT
"${CARGO_TARGET_DIR:-target}/debug/memory-overload" "$work" "$CACHE_MIB" "$SECONDS_" "$TIERS"
