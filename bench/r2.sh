#!/usr/bin/env bash
# R2: restore of a 1 GiB point vs `cp` of a 1 GiB file on the same disk
# (each followed by making its output durable). Prints both and, last,
# the ratio of cp's time to restore's (>= 0.8 means restore is at least
# 0.8x as fast as cp).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
start_daemon <<TOML
[journal]
file_cache = "512M"
TOML
head -c 1G /dev/urandom >"$work/source.img"
tm volume create r2 --size 1G --mode async >/dev/null
nbdcopy "$work/source.img" "nbd://$nbd/r2"
tm volume set-mode r2 sync >/dev/null
tm tag create r2 full >/dev/null

now() { date +%s.%N; }
# Both sides start cold where the machine lets us drop the page cache
# (the journal's segments are written with O_DIRECT and never cached, so a
# warm cp would compare the page cache with the disk).
cold() { sync; if [ -w /proc/sys/vm/drop_caches ]; then echo 3 >/proc/sys/vm/drop_caches; fi; }
[ -w /proc/sys/vm/drop_caches ] && echo "page cache dropped before each run" || echo "page cache NOT dropped (no permission): cp reads a warm source"
best_cp=999; best_restore=999
for round in 1 2 3; do
  rm -f "$work/cp.img" "$work/restored.img"
  cold; t0=$(now); cp "$work/source.img" "$work/cp.img"; sync "$work/cp.img"; t1=$(now)
  cold; t1=$(now); tm restore r2 --at tag:full --to "$work/restored.img" >/dev/null 2>&1; t2=$(now)
  cmp -s "$work/source.img" "$work/restored.img" || { echo "bench: restored image differs" >&2; exit 1; }
  read -r best_cp best_restore < <(python3 -c "print(min($best_cp, $t1-$t0), min($best_restore, $t2-$t1))")
  echo "round $round: cp $(python3 -c "print(f'{$t1-$t0:.2f}')") s, restore $(python3 -c "print(f'{$t2-$t1:.2f}')") s"
done
python3 -c "print(f'R2 restore/cp speed ratio {$best_cp/$best_restore:.2f} (best of 3: cp {$best_cp:.2f} s, restore {$best_restore:.2f} s)')"
