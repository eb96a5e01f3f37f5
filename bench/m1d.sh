#!/usr/bin/env bash
# M1 through the daemon: the daemon's peak resident memory while four NBD
# connections write 1 MiB async writes as fast as they can (a volume in
# async mode takes them as fast as the production file does and leaves the
# journal to follow, so the memory cache fills), against the bound: memory
# cache + NBD buffer memory + 64 MiB. The bound is for the memory the
# daemon owns (anonymous); file-backed resident pages (segments mapped for
# reading, clean page cache the kernel reclaims) are reported beside it.
# The journal-only M1 is bench/m1.sh.
#
#   bash bench/m1d.sh                  # 128 MiB cache, 20 s
#   CACHE_MIB=256 SECS=60 bash bench/m1d.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
cache_mib="${CACHE_MIB:-128}"
secs="${SECS:-20}"
nbd_mib=32
start_daemon <<TOML
[journal]
memory_cache = "${cache_mib}M"
cache_tiers = "memory"
[limits]
nbd_buffer_memory = "${nbd_mib}M"
TOML
pid=${pids[0]}
tm volume create m1 --size 4G --mode async >/dev/null
rss() { awk '/^RssAnon/ {print int($2 / 1024)}' "/proc/$pid/status"; }
idle=$(rss)
fio --name=m1 --ioengine=nbd --uri="nbd://$nbd/m1" --rw=write --bs=1M --iodepth=16 \
  --numjobs=4 --size=4G --time_based --runtime="$secs" --group_reporting \
  --output-format=json 2>/dev/null >"$work/fio.json" &
fio_pid=$!
peak=0 cache_peak=0
while kill -0 "$fio_pid" 2>/dev/null; do
  now=$(rss)
  [ "$now" -gt "$peak" ] && peak=$now
  used=$(curl -s "http://$http/metrics" | awk '/^tidemark_cache_bytes\{.*tier="memory"/ {s += $2} END {print int(s / 1048576)}')
  [ "${used:-0}" -gt "$cache_peak" ] && cache_peak=$used
  sleep 0.2
done
wait "$fio_pid" || true
bw=$(python3 -c 'import json,sys; t=open(sys.argv[1]).read(); print(json.loads(t[t.index("{"):])["jobs"][0]["write"]["bw_bytes"] >> 20)' "$work/fio.json")
hwm=$(awk '/^VmHWM/ {print int($2 / 1024)}' "/proc/$pid/status")
bound=$((cache_mib + nbd_mib + 64))
echo "daemon idle ${idle} MiB anonymous; under ${bw} MiB/s of async 1 MiB writes for ${secs} s the memory cache peaked at ${cache_peak} MiB of ${cache_mib}"
verdict=met; [ "$peak" -le "$bound" ] || verdict="NOT met"
echo "M1 through the daemon: peak anonymous resident ${peak} MiB; bound cache ${cache_mib} + NBD buffers ${nbd_mib} + 64 = ${bound} MiB: ${verdict} (peak resident with file-backed pages ${hwm} MiB)"
