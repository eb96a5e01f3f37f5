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

# The peer: `nbdkit file` on a fresh sparse file of SIZE (default 2G) beside
# the daemon's data, on a free loopback port; sets $nbdkit_uri and
# $nbdkit_pid.
start_nbdkit() {
  truncate -s "${1:-2G}" "$work/nbdkit.img"
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  nbdkit -f -i 127.0.0.1 -p "$port" file "$work/nbdkit.img" &
  nbdkit_pid=$!
  pids+=("$nbdkit_pid")
  nbdkit_uri="nbd://127.0.0.1:$port/"
  for _ in $(seq 1 100); do nbdinfo --size "$nbdkit_uri" >/dev/null 2>&1 && break; sleep 0.1; done
}

# A real S3-compatible server (moto, installed by scripts/setup.sh) on a
# free loopback port, with a bucket named "bench"; sets $s3_endpoint and
# the AWS environment the daemons and the CLI read.
start_moto() {
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  "$TIDEMARK_MOTO_SERVER" -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
  pids+=($!)
  s3_endpoint="http://127.0.0.1:$port"
  export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_REGION=us-east-1 AWS_EC2_METADATA_DISABLED=true
  moto_python="$(dirname "$TIDEMARK_MOTO_SERVER")/python"
  for _ in $(seq 1 100); do
    "$moto_python" - "$s3_endpoint" <<'PY' 2>/dev/null && return 0
import sys, boto3
boto3.client("s3", endpoint_url=sys.argv[1]).create_bucket(Bucket="bench")
PY
    sleep 0.2
  done
  cat "$work/moto.log" >&2; echo "bench: moto did not start" >&2; exit 1
}

# Waits until group $1's archive holds its newest record.
wait_archived() {
  local vol=$1 newest
  newest=$(tm volume show "$vol" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["newest_seq"])')
  for _ in $(seq 1 1200); do
    tm archive status --json | python3 -c '
import json, sys
s = json.load(sys.stdin)
g = [g for g in s["groups"] if g["group"] == sys.argv[1]]
sys.exit(0 if g and g[0]["archived_seq"] >= int(sys.argv[2]) else 1)' "$vol" "$newest" && return 0
    sleep 0.5
  done
  echo "bench: the archive of $vol did not catch up" >&2; tm archive status >&2; exit 1
}
