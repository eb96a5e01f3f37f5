#!/usr/bin/env bash
# F1: time from `kill -9` of the primary to the replica serving writes.
# A primary and a replica site (auto takeover, heartbeats every 200 ms) on
# loopback; each trial creates a volume on a fresh primary, replicates it
# in sync mode, kills the primary and times how long until a write to the
# replica's live export succeeds (qemu-io over NBD). Prints every trial
# and, last, the median and p95 against the 3 s target.
#
#   bash bench/f1.sh            # 20 trials
#   TRIALS=5 bash bench/f1.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
trials="${TRIALS:-20}"
start_site replica <<TOML
[replication]
heartbeat = "200ms"
[failover]
auto = true
heartbeat = "200ms"
TOML
times=()
for i in $(seq 1 "$trials"); do
  start_site "p$i" <<TOML
[replication]
heartbeat = "200ms"
TOML
  grpc_var="p${i}_grpc"; token_var="p${i}_token"
  ptm() { TIDEMARK_TOKEN_FILE="${!token_var}" "$bin" --server "${!grpc_var}" "$@"; }
  ptm volume create "f1-$i" --size 64M --mode sync >/dev/null
  ptm replica add "f1-$i" --to "$replica_grpc" --mode sync --token-file "$replica_token" >/dev/null
  for _ in $(seq 1 100); do
    ptm replica list --json | grep -q '"state": *"streaming"' && break
    sleep 0.1
  done
  sleep 2   # the detector learns the heartbeat rhythm
  pid=${pids[-1]}
  kill -9 "$pid"
  start=$(date +%s.%N)
  until qemu-io -f raw -c "write 0 4k" "nbd://$replica_nbd/f1-$i" >/dev/null 2>&1; do
    sleep 0.02
    if python3 -c "import sys; sys.exit(0 if $(date +%s.%N) - $start < 60 else 1)"; then :; else
      echo "trial $i: no takeover within 60 s" >&2; exit 1
    fi
  done
  end=$(date +%s.%N)
  t=$(python3 -c "print(f'{$end - $start:.2f}')")
  times+=("$t")
  echo "trial $i: primary killed -> replica serving writes in $t s"
done
python3 - "${times[@]}" <<'PY'
import statistics, sys
t = sorted(float(x) for x in sys.argv[1:])
p95 = t[min(len(t) - 1, int(round(0.95 * (len(t) - 1))))]
med = statistics.median(t)
print(f"F1 takeover: {len(t)} trials, median {med:.2f} s, p95 {p95:.2f} s, max {t[-1]:.2f} s")
print(f"F1 median {med:.2f} s = {med/3:.2f}x the 3 s target")
PY
