# Shared by the daemon benches: build, start daemons on ephemeral ports in
# a scratch directory ($work), and clean up on exit. `start_daemon` sets
# $nbd, $grpc, $http for the daemon `tm` talks to; `start_site NAME` starts
# another (a replica site) and sets ${NAME}_nbd, ${NAME}_grpc, ${NAME}_http
# and ${NAME}_token (its API token file).
source scripts/setup.sh
cargo build --workspace --bins --locked -q
bin="$CARGO_TARGET_DIR/debug/tidemark"
work=$(mktemp -d "${BENCH_DIR:-/var/tmp}/tidemark-bench.XXXXXX")
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

start_site() { # NAME; extra TOML lines on stdin
  local name=$1
  { echo 'log = "warn"'; cat; } >"$work/$name.toml"
  "$bin" serve --config "$work/$name.toml" --data-dir "$work/$name" \
    --nbd 127.0.0.1:0 --grpc 127.0.0.1:0 --http 127.0.0.1:0 >"$work/$name.out" 2>"$work/$name.log" &
  pids+=($!)
  for _ in $(seq 1 600); do grep -q serving "$work/$name.out" 2>/dev/null && break; sleep 0.1; done
  local line
  line=$(cat "$work/$name.out")
  [[ "$line" == *serving* ]] || { cat "$work/$name.log" >&2; echo "bench: daemon $name did not start" >&2; exit 1; }
  printf -v "${name}_nbd" '%s' "$(sed -n 's/.*nbd:\/\/\([^ ]*\).*/\1/p' <<<"$line")"
  printf -v "${name}_grpc" '%s' "$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' <<<"$line")"
  printf -v "${name}_http" '%s' "$(sed -n 's/.*http=http:\/\/\([^ ]*\).*/\1/p' <<<"$line")"
  printf -v "${name}_token" '%s' "$work/$name/api.token"
}

start_daemon() { # extra TOML lines on stdin
  start_site data
  nbd=$data_nbd grpc=$data_grpc http=$data_http
}
tm() { TIDEMARK_TOKEN_FILE="$work/data/api.token" "$bin" --server "$grpc" "$@"; }
