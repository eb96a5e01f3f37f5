#!/usr/bin/env bash
# A2: time from NBD connect to the first byte of NAME@latest served from
# the bucket by a daemon that does not hold the volume, for a 1 GiB and a
# 16 GiB volume that each hold 64 MiB of random writes (moto on loopback).
# Prints the median and worst per volume and, last, the ratio of the
# 16 GiB median to the 1 GiB median (target: under 1 s, flat in size).
#
#   bash bench/a2.sh                              # the point at a base version
#   BASE_EVERY=1h WAIT_BASE=0 bash bench/a2.sh    # the point after 64 MiB of segments
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
start_moto
archive() {
  cat <<TOML
[archive]
url = "s3://bench/a2"
endpoint = "$s3_endpoint"
upload_after = "1s"
base_every = "${BASE_EVERY:-1s}"
TOML
}
start_daemon <<TOML
[retention]
max_bytes = "32M"
interval = "1s"
$(archive)
TOML
for size in 1G 16G; do
  tm volume create "a2-$size" --size "$size" --mode async >/dev/null
  fio --name=fill --ioengine=nbd --uri="nbd://$nbd/a2-$size" --rw=randwrite --bs=64k --iodepth=16 \
      --size="$size" --io_size=64M --refill_buffers --output=/dev/null
  wait_archived "a2-$size"
done
# Until each group's newest base version is at its newest archived seq:
# a view then fetches no segments, and what is left is what grows with the
# volume's size, if anything does.
for size in 1G 16G; do
  [[ "${WAIT_BASE:-1}" == 1 ]] || break
  for _ in $(seq 1 240); do
    tm archive status --json | python3 -c '
import json, sys
g = [g for g in json.load(sys.stdin)["groups"] if g["group"] == sys.argv[1]][0]
sys.exit(0 if g["base_seq"] >= g["archived_seq"] else 1)' "a2-$size" && break
    sleep 0.5
  done
done
start_site empty <<<"$(archive)"
declare -A median
for size in 1G 16G; do
  read -r med worst < <("$CARGO_TARGET_DIR/debug/nbd-first-byte" "$empty_nbd" "a2-$size@latest" 10)
  median[$size]=$med
  echo "$size volume (64 MiB written): first byte of a2-$size@latest from the bucket median ${med} ms, worst ${worst} ms"
done
python3 -c "print(f'A2 16G/1G first-byte ratio {${median[16G]}/${median[1G]}:.2f} (median {${median[16G]}} ms vs {${median[1G]}} ms)')"
