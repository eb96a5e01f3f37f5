#!/usr/bin/env bash
# R1: time from NBD connect to the first byte of NAME@POINT, for a 1 GiB
# and a 16 GiB volume whose journals each hold RECORDS (default 1 M) 4 KiB
# writes. Prints the median and worst per volume and, last, the ratio of
# the 16 GiB median to the 1 GiB median (target: < 50 ms, no growth).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
records="${RECORDS:-1000000}"
start_daemon <<TOML
[journal]
file_cache = "512M"
TOML

declare -A median
for size in 1G 16G; do
  vol="r1-$size"
  tm volume create "$vol" --size "$size" --mode async >/dev/null
  # Exactly $records writes, blocks hit more than once where the volume
  # has fewer blocks than that.
  fio --name=fill --ioengine=nbd --uri="nbd://$nbd/$vol" --rw=randwrite --bs=4k --iodepth=32 \
      --size="$size" --io_size=$((records * 4))k --norandommap --randrepeat=0 --output=/dev/null
  tm volume set-mode "$vol" sync >/dev/null
  seq=$(tm volume show "$vol" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["newest_seq"])')
  point=$((seq / 2))
  read -r med worst < <("$CARGO_TARGET_DIR/debug/nbd-first-byte" "$nbd" "$vol@$point" 50)
  median[$size]=$med
  echo "$size volume, $records records: first byte of $vol@$point median ${med} ms, worst ${worst} ms"
done
python3 -c "print(f'R1 16G/1G first-byte ratio {${median[16G]}/${median[1G]}:.2f} (median {${median[16G]}} ms vs {${median[1G]}} ms)')"
