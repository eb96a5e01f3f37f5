#!/usr/bin/env bash
# W1 with replication: fio randwrite 4 KiB QD16 over NBD on a volume
# replicated to a second daemon (loopback) in each mode, and on the same
# kind of volume unreplicated, in one run. Prints IOPS per run and, last,
# each mode's ratio to the unreplicated volume (the cost of the second
# site), with the unreplicated figure beside them.
#
#   bash bench/w1r.sh                   # 20 s per run, volumes in IO mode sync
#   RUNTIME=60 IO_MODE=async bash bench/w1r.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
runtime="${RUNTIME:-20}"
io_mode="${IO_MODE:-sync}"
start_site replica <<TOML
[journal]
file_cache = "1G"
TOML
start_daemon <<TOML
[journal]
file_cache = "1G"
TOML
for target in plain async sync adaptive; do
  tm volume create "w-$target" --size 2G --mode "$io_mode" >/dev/null
  if [ "$target" != plain ]; then
    tm replica add "w-$target" --to "$replica_grpc" --mode "$target" --token-file "$replica_token" >/dev/null
  fi
done

run_fio() { # uri -> iops
  fio --name=bench --ioengine=nbd --uri="$1" --rw=randwrite --bs=4k --iodepth=16 \
      --size=2G --time_based --runtime="$runtime" --ramp_time=2 --randrepeat=0 \
      --output-format=json 2>/dev/null |
    python3 -c 'import json,sys; t=sys.stdin.read(); j=json.loads(t[t.index("{"):])["jobs"][0]["write"]; print(round(j["iops"]))'
}

declare -A iops
for target in plain async sync adaptive; do
  iops[$target]=$(run_fio "nbd://$nbd/w-$target")
  echo "$target: W1 randwrite 4k qd16 ${iops[$target]} IOPS (volumes in IO mode $io_mode)"
done
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
echo "W1 replicated async $(ratio "${iops[async]}" "${iops[plain]}")x sync $(ratio "${iops[sync]}" "${iops[plain]}")x adaptive $(ratio "${iops[adaptive]}" "${iops[plain]}")x (vs unreplicated ${iops[plain]} IOPS)"
