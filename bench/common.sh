# Shared by the daemon benches: build, start a daemon on ephemeral ports in
# a scratch directory ($work), and clean up on exit. Sets $bin, $nbd, $grpc.
source scripts/setup.sh
cargo build --workspace --bins --locked -q
bin="$CARGO_TARGET_DIR/debug/tidemark"
work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/tidemark-bench.XXXXXX")
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

start_daemon() { # extra TOML lines on stdin
  { echo 'log = "warn"'; cat; } >"$work/tidemark.toml"
  "$bin" serve --config "$work/tidemark.toml" --data-dir "$work/data" \
    --nbd 127.0.0.1:0 --grpc 127.0.0.1:0 --http 127.0.0.1:0 >"$work/serve.out" 2>"$work/serve.log" &
  pids+=($!)
  for _ in $(seq 1 600); do grep -q serving "$work/serve.out" 2>/dev/null && break; sleep 0.1; done
  nbd=$(sed -n 's/.*nbd:\/\/\([^ ]*\).*/\1/p' "$work/serve.out")
  grpc=$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' "$work/serve.out")
  [ -n "$nbd" ] || { cat "$work/serve.log" >&2; echo "bench: daemon did not start" >&2; exit 1; }
}
tm() { "$bin" --server "$grpc" "$@"; }
