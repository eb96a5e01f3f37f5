#!/usr/bin/env bash
# P1: replica lag while a steady write load runs. Two daemons on loopback
# (a primary and a replica site); fio writes 1 MiB blocks at a fixed rate
# (50 MB/s by default) to a volume replicated in async mode, while
# `tidemark_replica_lag_seconds` is sampled every 100 ms from the
# primary's /metrics. Prints p50/p99/max of the lag and, last, p99 against
# the 1 s target.
#
#   bash bench/p1.sh                     # 30 s at 50 MB/s
#   RUNTIME=60 RATE=100m bash bench/p1.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
runtime="${RUNTIME:-30}"
rate="${RATE:-50m}"
start_site replica </dev/null
start_daemon </dev/null
tm volume create p1 --size 4G --mode sync >/dev/null
tm replica add p1 --to "$replica_grpc" --mode async --token-file "$replica_token" >/dev/null

python3 - "$http" "$runtime" >"$work/lag.txt" <<'PY' &
import sys, time, urllib.request
http, runtime = sys.argv[1], float(sys.argv[2])
end = time.time() + runtime + 2
while time.time() < end:
    text = urllib.request.urlopen(f"http://{http}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith("tidemark_replica_lag_seconds{") and 'volume="p1"' in line:
            print(line.rsplit(" ", 1)[1], flush=True)
    time.sleep(0.1)
PY
sampler=$!
pids+=($sampler)
fio --name=p1 --ioengine=nbd --uri="nbd://$nbd/p1" --rw=write --bs=1M --iodepth=4 \
    --size=4G --time_based --runtime="$runtime" --rate="$rate" --output-format=json \
    >"$work/fio.json" 2>/dev/null
wait "$sampler"
written=$(python3 -c 'import json,sys; t=open(sys.argv[1]).read(); j=json.loads(t[t.index("{"):])["jobs"][0]["write"]; print(round(j["bw_bytes"]/1e6, 1))' "$work/fio.json")
python3 - "$work/lag.txt" "$written" "$rate" <<'PY'
import sys
lags = sorted(float(x) for x in open(sys.argv[1]) if x.strip())
if not lags:
    sys.exit("P1: no lag samples (is the replica running?)")
q = lambda p: lags[min(len(lags) - 1, int(p * len(lags)))]
print(f"P1: {len(lags)} samples at {sys.argv[2]} MB/s written (fio rate {sys.argv[3]}): lag p50 {q(0.5):.3f} s, p99 {q(0.99):.3f} s, max {lags[-1]:.3f} s")
print(f"P1 replica lag p99 {q(0.99):.3f} s = {q(0.99) / 1.0:.2f}x the 1 s target (async, loopback)")
PY
