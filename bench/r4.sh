#!/usr/bin/env bash
# R4: copy time of a mostly empty volume — 4 GiB holding 64 MiB of random
# 1 MiB writes — with `nbdcopy URI null:`, from tidemark's live export and
# from NAME@latest, against `nbdkit file` serving the same bytes (the
# volume's production file, read-only), in one run. Copy tools ask for
# block status and skip holes; before tidemark answered it, the live copy
# took 4.08 s and the point 8.20 s against nbdkit's 0.10 s. Prints the
# three times (medians of 3) and, last, tidemark's time over nbdkit's
# (target: at most 3).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
start_daemon <<TOML
TOML
backing="$work/r4.img"
truncate -s 4G "$backing"
tm volume create r4 --size 4G --mode async --backing "$backing" >/dev/null
fio --name=fill --ioengine=nbd --uri="nbd://$nbd/r4" --rw=randwrite --bs=1M --iodepth=8 \
    --size=4G --io_size=64M --refill_buffers --randrepeat=0 --output=/dev/null
tm tag create r4 filled >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
nbdkit -f -r -i 127.0.0.1 -p "$port" file "$backing" &
pids+=($!)
for _ in $(seq 1 100); do nbdinfo --size "nbd://127.0.0.1:$port/" >/dev/null 2>&1 && break; sleep 0.1; done

copy() { # URI -> seconds
  local start end
  start=$(date +%s.%N)
  nbdcopy "$1" null:
  end=$(date +%s.%N)
  python3 -c "print(f'{$end - $start:.3f}')"
}
median() { printf '%s\n' "$@" | sort -n | sed -n 2p; }
live=() point=() peer=()
for _ in 1 2 3; do
  peer+=("$(copy "nbd://127.0.0.1:$port/")")
  live+=("$(copy "nbd://$nbd/r4")")
  point+=("$(copy "nbd://$nbd/r4@latest")")
done
p=$(median "${peer[@]}") l=$(median "${live[@]}") t=$(median "${point[@]}")
echo "R4 nbdkit file ${peer[*]} s; tidemark live ${live[*]} s; r4@latest ${point[*]} s"
python3 -c "print(f'R4 time over nbdkit live {$l / $p:.2f}x, @latest {$t / $p:.2f}x (medians: nbdkit {$p} s, live {$l} s, @latest {$t} s)')"
