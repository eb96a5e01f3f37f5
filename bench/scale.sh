#!/usr/bin/env bash
# Scale in one daemon.
#
#   bash bench/scale.sh volumes     # VOLUMES=1000: create and serve N volumes
#   bash bench/scale.sh startup     # start-up time, 1 GiB vs 32 GiB of journal
#
# `volumes` creates VOLUMES volumes (one consistency group each, the
# default cache tiers and budgets, shared by all groups; small segments,
# which every group preallocates one or two of), then
# reports the time to create them, resident memory and threads per volume,
# the `/metrics` scrape time, a write and a read on the last volume, and the
# daemon's start-up time with all of them. `startup` fills a volume's
# journal to SMALL_GIB and then LARGE_GIB (async 1 MiB writes) and times a
# restart at each: flat in journal size is the goal.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
what="${1:-volumes}"

rss_mib() { awk '/^VmRSS/ {print int($2 / 1024)}' "/proc/$1/status"; }
threads() { awk '/^Threads/ {print $2}' "/proc/$1/status"; }
now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$2 - $1:.2f}')"; }

# Stops the data daemon and starts it again on the same data directory;
# sets $startup to the seconds until it says it is serving.
restart() {
  kill "${pids[0]}"
  wait "${pids[0]}" 2>/dev/null || true
  local t0
  t0=$(now)
  "$bin" serve --config "$work/data.toml" --data-dir "$work/data" \
    --nbd 127.0.0.1:0 --grpc 127.0.0.1:0 --http 127.0.0.1:0 >"$work/data.out" 2>"$work/data.log" &
  pids[0]=$!
  for _ in $(seq 1 36000); do grep -q serving "$work/data.out" 2>/dev/null && break; sleep 0.05; done
  grep -q serving "$work/data.out" || { cat "$work/data.log" >&2; echo "bench: the daemon did not come back" >&2; exit 1; }
  startup=$(elapsed "$t0" "$(now)")
  local line
  line=$(cat "$work/data.out")
  nbd=$(sed -n 's/.*nbd:\/\/\([^ ]*\).*/\1/p' <<<"$line")
  grpc=$(sed -n 's/.*grpc=\([^ ]*\).*/\1/p' <<<"$line")
  http=$(sed -n 's/.*http=http:\/\/\([^ ]*\).*/\1/p' <<<"$line")
}

case "$what" in
volumes)
  n="${VOLUMES:-1000}"
  start_daemon <<TOML
TOML
  pid=${pids[0]}
  base_rss=$(rss_mib "$pid") base_threads=$(threads "$pid")
  t0=$(now)
  for i in $(seq 1 "$n"); do
    tm volume create "s$i" --size 64M --mode async >/dev/null
  done
  created=$(elapsed "$t0" "$(now)")
  rss=$(rss_mib "$pid") nthreads=$(threads "$pid")
  t0=$(now)
  curl -sf "http://$http/metrics" >"$work/metrics.txt"
  scrape=$(elapsed "$t0" "$(now)")
  lines=$(wc -l <"$work/metrics.txt")
  head -c 1M /dev/urandom >"$work/mib"
  nbdcopy "$work/mib" "nbd://$nbd/s$n" 2>/dev/null || qemu-img convert -n -f raw -O raw "$work/mib" "nbd://$nbd/s$n"
  nbdcopy "nbd://$nbd/s$n@latest" "$work/back" 2>/dev/null
  cmp -n 1048576 "$work/mib" "$work/back" >/dev/null && io=ok || io=FAILED
  echo "$n volumes created in ${created} s; daemon ${rss} MiB resident (idle ${base_rss}), $(( (rss - base_rss) * 1024 / n )) KiB per volume; ${nthreads} threads (idle ${base_threads})"
  echo "/metrics: ${lines} lines in ${scrape} s; write + read of s$n: ${io}"
  rings=$(find "$work/data/groups" -name file-cache.ring | wc -l)
  echo "file-cache rings: ${rings}, $(du -sk --apparent-size "$work"/data/groups/*/cache | awk '{s+=$1} END {print int(s/1024)}') MiB apparent, $(du -sk "$work"/data/groups/*/cache | awk '{s+=$1} END {print int(s/1024)}') MiB on disk"
  du_mib() { du -sk "$@" "$work"/data/groups/*/segments | awk '{s+=$1} END {print int(s/1024)}'; }
  echo "segments: $(find "$work/data/groups" -name '*.seg' | wc -l), $(du_mib --apparent-size) MiB apparent, $(du_mib) MiB on disk"
  restart
  echo "start-up with $n volumes: ${startup} s; resident after start-up $(rss_mib "${pids[0]}") MiB"
  ;;
startup)
  small="${SMALL_GIB:-1}" large="${LARGE_GIB:-32}"
  start_daemon <<TOML
[journal]
file_cache = "1G"
TOML
  tm volume create big --size 4G --mode async >/dev/null
  fill() { # total GiB the journal should hold
    local have want
    have=$(tm volume show big --json | python3 -c 'import json,sys; print(json.load(sys.stdin).get("journal_bytes", 0))')
    want=$(( $1 * 1073741824 - have ))
    [ "$want" -gt 0 ] || return 0
    fio --name=fill --ioengine=nbd --uri="nbd://$nbd/big" --rw=write --bs=1M --iodepth=16 \
      --size=4G --io_size="$want" --randrepeat=0 --refill_buffers >/dev/null 2>&1
  }
  for gib in "$small" "$large"; do
    fill "$gib"
    journal=$(du -sm "$work/data/groups" | cut -f1)
    restart
    echo "journal ${journal} MiB on disk: start-up ${startup} s"
  done
  ;;
*)
  echo "usage: bash bench/scale.sh volumes|startup" >&2
  exit 2
  ;;
esac
