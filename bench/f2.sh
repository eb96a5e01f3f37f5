#!/usr/bin/env bash
# F2: false takeovers under a jittery, lossy link. The phi-accrual
# detector, with the daemon's default [failover] settings, is fed a
# generated trace of heartbeats every 200 ms with ±50 % jitter and 1 % of
# them lost, for MINUTES minutes (default 10) and three seeds; prints the
# false suspicions (target 0) and how long the same settings take to
# notice a real death.
#
#   bash bench/f2.sh
#   MINUTES=60 bash bench/f2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
cargo build --workspace --bins --locked -q
minutes="${MINUTES:-10}"
for seed in 1 2 3; do
  "$CARGO_TARGET_DIR/debug/failover-detector" "$minutes" "$seed"
done | tee /dev/stderr | grep -c "false suspicions 0 " | {
  read -r clean
  echo "F2 seeds without a false suspicion: $clean of 3 (target 3)"
}
