#!/usr/bin/env bash
# CPU per byte: the same fio jobs (random 4 KiB and sequential 1 MiB
# writes, queue depth 16, a fixed amount of data) against tidemark volumes
# (async, sync) and against `nbdkit file`, in one run. Reports each
# server's CPU seconds (user + system of its process, from /proc/PID/stat,
# counted until it is idle again after the job) per GiB written, and the
# ratio to nbdkit's: a figure that a busy or noisy machine moves far less
# than IOPS. Where `perf stat` can count instructions, also instructions
# per 4 KiB write.
#
#   bash bench/cpu.sh                 # 1 GiB per job
#   GIB=4 bash bench/cpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
gib="${GIB:-1}"
start_daemon <<TOML
[journal]
file_cache = "1G"
TOML
daemon_pid=${pids[0]}
for mode in async sync; do
  tm volume create "c-$mode" --size 2G --mode "$mode" >/dev/null
done

start_nbdkit 2G

hz=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# Waits until process $1 uses no CPU for a second (background work the
# job left: group commits, dirty-map rounds, index flushes).
settle() {
  local last now
  last=$(ticks "$1")
  for _ in $(seq 1 30); do
    sleep 1
    now=$(ticks "$1")
    [ "$now" -le $((last + 1)) ] && return 0
    last=$now
  done
}

# Counts instructions of process $1 while the rest of the command runs;
# prints the count, or nothing where the machine has no counters.
instructions_during() {
  local pid=$1 out
  shift
  out=$(mktemp)
  perf stat -x, -e instructions -p "$pid" -o "$out" -- "$@" >/dev/null 2>&1 || { "$@" >/dev/null; }
  awk -F, '$3 == "instructions" && $1 ~ /^[0-9]+$/ {print $1}' "$out" 2>/dev/null
  rm -f "$out"
}

run_fio() { # uri rw bs
  fio --name=cpu --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth=16 \
    --size=2G --io_size="${gib}G" --randrepeat=0 --output-format=terse >/dev/null 2>&1
}

declare -A cpu instr
for target in nbdkit async sync; do
  if [ "$target" = nbdkit ]; then pid=$nbdkit_pid uri=$nbdkit_uri; else pid=$daemon_pid uri="nbd://$nbd/c-$target"; fi
  for job in "randwrite 4k" "write 1M"; do
    read -r rw bs <<<"$job"
    settle "$pid"
    before=$(ticks "$pid")
    count=$(instructions_during "$pid" run_fio "$uri" "$rw" "$bs")
    settle "$pid"
    after=$(ticks "$pid")
    secs=$(python3 -c "print(f'{($after - $before) / $hz / $gib:.2f}')")
    cpu[$target/$bs]=$secs
    line="$target: $rw $bs: ${secs} CPU s/GiB"
    if [ -n "$count" ] && [ "$bs" = 4k ]; then
      instr[$target]=$((count / (gib * 262144)))
      line+=", ${instr[$target]} instructions per 4 KiB write"
    fi
    echo "$line"
  done
done
ratio() { python3 -c "print(f'{$1 / max($2, 0.01):.2f}')"; }
echo "CPU per GiB vs nbdkit file (nbdkit 4k ${cpu[nbdkit/4k]} s, 1M ${cpu[nbdkit/1M]} s):" \
  "4k async $(ratio "${cpu[async/4k]}" "${cpu[nbdkit/4k]}")x sync $(ratio "${cpu[sync/4k]}" "${cpu[nbdkit/4k]}")x;" \
  "1M async $(ratio "${cpu[async/1M]}" "${cpu[nbdkit/1M]}")x sync $(ratio "${cpu[sync/1M]}" "${cpu[nbdkit/1M]}")x"
[ -n "${instr[nbdkit]:-}" ] || echo "instructions: perf stat cannot count them on this machine"
