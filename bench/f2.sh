#!/usr/bin/env bash
# F2: false takeovers under a jittery, lossy link. Two parts:
#  - the phi-accrual detector, with the daemon's default [failover]
#    settings, fed a generated trace of heartbeats every 200 ms with ±50 %
#    jitter and 1 % of them lost, for MINUTES minutes (default 10) and
#    three seeds: the false suspicions (target 0) and how long the same
#    settings take to notice a real death;
#  - a real run of SECONDS (default 60): a primary and a replica site with
#    `auto = true`, heartbeats every 200 ms, through a link that delays
#    every chunk by 0-200 ms (±50 % of the interval, in order) and holds
#    1 % of them back 200 ms more (a lost packet's retransmission): the
#    takeovers (target 0) and the worst phi seen, then the primary is
#    killed and the time until the replica takes over is printed.
#
#   bash bench/f2.sh
#   MINUTES=60 SECONDS_REAL=600 bash bench/f2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
minutes="${MINUTES:-10}"
real="${SECONDS_REAL:-60}"
clean=$(for seed in 1 2 3; do
  "$CARGO_TARGET_DIR/debug/failover-detector" "$minutes" "$seed"
done | tee /dev/stderr | grep -c "false suspicions 0 " || true)
echo "F2 trace: $clean of 3 seeds without a false suspicion" >&2

start_site replica <<TOML
[failover]
auto = true
heartbeat = "200ms"
TOML
start_site primary <<TOML
[replication]
heartbeat = "200ms"
TOML
rtm() { TIDEMARK_TOKEN_FILE="$replica_token" "$bin" --server "$replica_grpc" "$@"; }
ptm() { TIDEMARK_TOKEN_FILE="$primary_token" "$bin" --server "$primary_grpc" "$@"; }
python3 bench/jittery_link.py "${replica_grpc#http://}" 100 100 0.01 200 1 >"$work/link.port" &
pids+=($!)
for _ in $(seq 1 50); do [[ -s "$work/link.port" ]] && break; sleep 0.1; done
link="127.0.0.1:$(cat "$work/link.port")"
ptm volume create f2 --size 64M --mode async >/dev/null
ptm replica add f2 --to "$link" --mode async --token-file "$replica_token" >/dev/null
for _ in $(seq 1 300); do
  ptm replica list --json | grep -q '"state": *"streaming"' && break
  sleep 0.1
done
echo "F2 real: $real s of heartbeats through a jittery, lossy link ($link)" >&2
worst=$(python3 - "$real" "$bin" "$replica_grpc" "$replica_token" <<'PY'
import json, os, subprocess, sys, time
seconds, binary, server, token = float(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
env = dict(os.environ, TIDEMARK_TOKEN_FILE=token)
worst, end = 0.0, time.time() + seconds
while time.time() < end:
    out = subprocess.run([binary, "--server", server, "status", "--json"], env=env,
                         capture_output=True, text=True, check=True).stdout
    f = json.loads(out)["failover"]
    worst = max(worst, f.get("phi") or 0.0)
    if f.get("takeovers", 0):
        print(f"{worst:.2f} TAKEOVER")
        sys.exit(0)
    time.sleep(0.2)
print(f"{worst:.2f}")
PY
)
takeovers=$(rtm status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["failover"]["takeovers"])')
echo "F2 real: takeovers $takeovers in $real s, worst phi ${worst% *} as sampled by status every 0.2 s (threshold 8)" >&2
disown "${pids[1]}" 2>/dev/null || true
kill -9 "${pids[1]}"
start=$(date +%s.%N)
until rtm volume show f2 --json | grep -q '"role": *"primary"'; do
  sleep 0.05
  if ! python3 -c "import sys; sys.exit(0 if $(date +%s.%N) - $start < 60 else 1)"; then
    echo "F2 real: no takeover within 60 s of the primary's death" >&2; exit 1
  fi
done
detected=$(python3 -c "print(f'{$(date +%s.%N) - $start:.2f}')")
echo "F2 real: the primary killed -> taken over after $detected s over the same link" >&2
ok=$(( clean == 3 && takeovers == 0 ? 1 : 0 ))
echo "F2 false takeovers: trace $((3 - clean)) of 3 seeds, real run $takeovers in $real s (target 0)$( ((ok)) && echo ' — met')"
