#!/usr/bin/env bash
# Quick start, command 1: installs what is missing, builds tidemark, starts
# the daemon with a demo volume and prints how to reach it. Ctrl-C stops
# the daemon cleanly (everything acknowledged is flushed).
#
#   bash scripts/run.sh [extra flags for `tidemark serve`]
#
# TIDEMARK_CONFIG picks another configuration file (default
# scripts/quickstart.toml); TIDEMARK_DEMO_SIZE the demo volume's size.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh

echo "== building tidemark (the first build compiles RocksDB: about ten minutes)"
cargo build --workspace --bins --locked
bin="$CARGO_TARGET_DIR/debug/tidemark"
config="${TIDEMARK_CONFIG:-scripts/quickstart.toml}"

"$bin" serve --config "$config" "$@" &
pid=$!
trap 'kill -TERM "$pid" 2>/dev/null; wait "$pid"' INT TERM

# Wait until the API answers (or the daemon has died).
for _ in $(seq 1 600); do
  if "$bin" status >/dev/null 2>&1; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then
    wait "$pid" || true
    echo "run: the daemon did not start (see the messages above)" >&2
    exit 1
  fi
  sleep 0.1
done

if ! "$bin" volume show demo >/dev/null 2>&1; then
  "$bin" volume create demo --size "${TIDEMARK_DEMO_SIZE:-1G}" --mode sync
fi
nbd=$("$bin" status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["nbd"])')
http=$(sed -n 's/^http *= *"\(.*\)"/\1/p' "$config" | head -1)
token=$(cat tidemark-data/api.token 2>/dev/null || true)

cat <<TEXT

tidemark is running; the volume "demo" is protected.

  console:  http://${http:-127.0.0.1:7701}/?token=$token
            (open it in a browser: it logs you in with the daemon's token)
  NBD:      nbd://$nbd/demo            (live volume: every write is journalled)
  points:   nbd://$nbd/demo@latest     (read-only; also demo@-5m, demo@tag:NAME, demo@1234)
  CLI:      $bin --help
  token:    $PWD/tidemark-data/api.token   (the CLI reads it from ./tidemark-data when run here;
            elsewhere: export TIDEMARK_TOKEN_FILE=$PWD/tidemark-data/api.token)
  metrics:  http://${http:-127.0.0.1:7701}/metrics

Try:
  nbdinfo nbd://$nbd/demo
  $bin tag create demo first
  $bin timeline demo
  $bin export demo --at tag:first

Ctrl-C stops the daemon.
TEXT

wait "$pid"
