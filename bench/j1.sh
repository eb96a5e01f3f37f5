#!/usr/bin/env bash
# J1 — journal append bandwidth against raw sequential write bandwidth on
# the same disk, measured in the same run (see docs/performance.md).
#
#   bash bench/j1.sh [DIR]        DIR: a directory on the disk under test
#                                 (default: $TIDEMARK_BENCH_DIR or /var/tmp)
#   SIZE_MIB=2048 ROUNDS=3 bash bench/j1.sh
#
# Peer: fio --rw=write --bs=1M --direct=1 (psync, queue depth 1).
# Journal: 1 MiB incompressible records (lz4 tried, stored raw), 64 in
# flight, each durable (fdatasync'd by group commit) before it counts.
# Rounds alternate peer and journal so drift hits both; the medians are
# compared. The last line is the ratio.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-${TIDEMARK_BENCH_DIR:-/var/tmp}}
SIZE_MIB=${SIZE_MIB:-1024}
ROUNDS=${ROUNDS:-3}
command -v fio >/dev/null || { echo "j1: fio is not installed (apt-get install fio)" >&2; exit 1; }
if [ -z "${CARGO_TARGET_DIR:-}" ] && [ -d "$HOME/.cache/tidemark-target" ]; then
  export CARGO_TARGET_DIR="$HOME/.cache/tidemark-target"
fi
cargo build -q -p tidemark-bench --bin journal-append
BIN="${CARGO_TARGET_DIR:-target}/debug/journal-append"

work=$(mktemp -d "$DIR/tidemark-j1.XXXXXX")
trap 'rm -rf "$work"' EXIT

# Deleting a gigabyte issues discards (on filesystems mounted with
# `discard`) and leaves dirty metadata; let both finish so neither side of
# the comparison pays for the other's cleanup.
settle() { sync; sleep 5; }

raw_rates=()
journal_rates=()
for round in $(seq 1 "$ROUNDS"); do
  fio --name=raw --filename="$work/raw" --rw=write --bs=1M --direct=1 --ioengine=psync \
      --size="${SIZE_MIB}M" --output-format=json >"$work/fio.json"
  raw=$(python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print("%.1f" % (j["jobs"][0]["write"]["bw_bytes"]/1e6))' "$work/fio.json")
  rm -f "$work/raw"
  settle
  # The memory tier alone: J1 measures the journal's append path, and a
  # 4 GiB file cache allocated and deleted every round would only add
  # discards that land on the other side's measurement.
  journal=$(TIDEMARK_CACHE_TIERS=memory "$BIN" "$work/journal" "$SIZE_MIB" 1024 incompressible 64 | awk '/^MB\/s/ {print $2}')
  rm -rf "$work/journal"
  settle
  echo "round $round: raw ${raw} MB/s, journal ${journal} MB/s"
  raw_rates+=("$raw")
  journal_rates+=("$journal")
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
raw_m=$(median "${raw_rates[@]}")
journal_m=$(median "${journal_rates[@]}")
python3 -c 'import sys; r,j=float(sys.argv[1]),float(sys.argv[2]); print("J1 = %.2f (journal %.1f MB/s / raw sequential %.1f MB/s; target >= 0.8)" % (j/r, j, r))' "$raw_m" "$journal_m"
