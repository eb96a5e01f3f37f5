#!/usr/bin/env bash
# W1/W2: fio over NBD against tidemark volumes (async, sync, adaptive) and
# against `nbdkit file` on the same disk, in one run. Prints one line per
# run and, last, the ratios against nbdkit.
#
#   bash bench/w1w2.sh            # 20 s per run
#   RUNTIME=60 bash bench/w1w2.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
runtime="${RUNTIME:-20}"
start_daemon <<TOML
[journal]
file_cache = "1G"
TOML
for mode in async sync adaptive; do
  tm volume create "w-$mode" --size 2G --mode "$mode" >/dev/null
done

start_nbdkit 2G

# fio prints IOPS and bandwidth as JSON (after a "connected" line of the
# nbd engine); two numbers per run.
run_fio() { # uri rw bs -> "iops bw_bytes"
  # Each run starts with no dirty page cache left by the one before (the
  # writeback of nbdkit's 2 GiB otherwise lands in the next run).
  sync
  fio --name=bench --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth=16 \
      --size=2G --time_based --runtime="$runtime" --ramp_time=2 --randrepeat=0 \
      --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]["write"]; print(round(j["iops"]), j["bw_bytes"])'
}

declare -A w1 w2
for target in nbdkit async sync adaptive; do
  if [ "$target" = nbdkit ]; then uri="$nbdkit_uri"; else uri="nbd://$nbd/w-$target"; fi
  read -r iops _ < <(run_fio "$uri" randwrite 4k)
  read -r _ bw < <(run_fio "$uri" write 1M)
  w1[$target]=$iops; w2[$target]=$bw
  echo "$target: W1 randwrite 4k qd16 ${iops} IOPS; W2 write 1M qd16 $((bw / 1048576)) MiB/s"
done
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
echo "W1 async $(ratio "${w1[async]}" "${w1[nbdkit]}")x sync $(ratio "${w1[sync]}" "${w1[nbdkit]}")x adaptive $(ratio "${w1[adaptive]}" "${w1[nbdkit]}")x; W2 async $(ratio "${w2[async]}" "${w2[nbdkit]}")x sync $(ratio "${w2[sync]}" "${w2[nbdkit]}")x adaptive $(ratio "${w2[adaptive]}" "${w2[nbdkit]}")x (vs nbdkit file)"
