#!/usr/bin/env bash
# W4: an application, not just fio. PostgreSQL on ext4 on a loop device
# over an `nbdfuse` file, on a tidemark volume (sync, async) and on
# `nbdkit file` on the same disk, in one run: `pgbench -i -s SCALE`, then
# `pgbench -c 4 -j 2 -T RUNTIME`; prints TPS per target and the ratios.
#
#   bash bench/pgbench.sh             # SCALE=10 RUNTIME=20 ROUNDS=1
#   TARGETS="nbdkit sync" bash bench/pgbench.sh
#
# ROUNDS > 1 runs every target that many times, interleaved, and prints
# each round (the page cache and the disk's own state move between runs).
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
scale="${SCALE:-10}" runtime="${RUNTIME:-20}" rounds="${ROUNDS:-1}"
targets="${TARGETS:-nbdkit sync async}"

for need in /dev/fuse /dev/loop-control; do
  [ -e "$need" ] || { echo "bench: skipped: this machine has no $need (FUSE and loop devices are needed)"; exit 0; }
done
if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
  apt-get install -y -q postgresql >/dev/null
fi
pgbin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
id postgres >/dev/null
# PostgreSQL runs as its own user and must reach its data directory.
chmod 755 "$work"

start_daemon <<TOML
[journal]
file_cache = "1G"
TOML
for mode in sync async; do
  tm volume create "pg-$mode" --size 2G --mode "$mode" >/dev/null
done
start_nbdkit 2G

# Everything mounted is undone on exit, before the daemons stop.
mounted=()
undo() {
  local m
  for m in "${mounted[@]}"; do eval "$m" >/dev/null 2>&1 || true; done
  mounted=()
}
trap 'undo; cleanup' EXIT

# Runs pgbench on a fresh filesystem over URI; sets $tps. (Not in a
# subshell: what it mounts must be undone by the exit trap if it fails.)
run_pg() { # target uri
  local t=$1 uri=$2 fuse="$work/fuse-$1" mnt="$work/mnt-$1" loop pgport
  mkdir -p "$fuse" "$mnt"
  nbdfuse "$fuse/" "$uri" 2>/dev/null &
  local fuse_pid=$!
  mounted=("kill $fuse_pid" "umount $fuse" "${mounted[@]}")
  for _ in $(seq 1 100); do [ -e "$fuse/nbd" ] && break; sleep 0.1; done
  loop=$(losetup -f --show "$fuse/nbd")
  mounted=("losetup -d $loop" "${mounted[@]}")
  mkfs.ext4 -q -F "$loop"
  mount "$loop" "$mnt"
  mounted=("umount $mnt" "${mounted[@]}")
  chown postgres: "$mnt"
  runuser -u postgres -- "$pgbin/initdb" -D "$mnt/data" >/dev/null 2>&1
  pgport=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  runuser -u postgres -- "$pgbin/pg_ctl" -D "$mnt/data" -l "$mnt/pg.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $pgport -k $mnt" start >/dev/null
  mounted=("runuser -u postgres -- $pgbin/pg_ctl -D $mnt/data -m fast -w stop" "${mounted[@]}")
  local pg=(runuser -u postgres -- "$pgbin/pgbench" -h 127.0.0.1 -p "$pgport")
  "${pg[@]}" -i -q -s "$scale" postgres >/dev/null 2>&1
  sync
  local before
  before=$(ticks "$server")
  tps=$("${pg[@]}" -c 4 -j 2 -T "$runtime" postgres 2>/dev/null |
    sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p')
  cpu=$(python3 -c "print(f'{($(ticks "$server") - $before) / $(getconf CLK_TCK):.1f}')")
  undo
  [ -n "$tps" ] || { echo "bench: pgbench on $t printed no TPS" >&2; exit 1; }
}

# CPU ticks (user + system) process $1 has used.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

declare -A sum
for round in $(seq 1 "$rounds"); do
  for target in $targets; do
    if [ "$target" = nbdkit ]; then
      uri="$nbdkit_uri" server=$nbdkit_pid
    else
      uri="nbd://$nbd/pg-$target" server=${pids[0]}
    fi
    run_pg "$target-$round" "$uri"
    sum[$target]=$(python3 -c "print(${sum[$target]:-0} + $tps)")
    echo "round $round $target: pgbench -s $scale -c 4 -j 2 -T $runtime: $tps TPS; server CPU ${cpu} s"
  done
done
ratio() { python3 -c "print(f'{$1/$2:.2f}')"; }
[ -n "${sum[nbdkit]:-}" ] && [ -n "${sum[sync]:-}" ] && [ -n "${sum[async]:-}" ] || exit 0
echo "W4 sync $(ratio "${sum[sync]}" "${sum[nbdkit]}")x async $(ratio "${sum[async]}" "${sum[nbdkit]}")x (vs nbdkit file: $(python3 -c "print(round(${sum[nbdkit]}/$rounds))") TPS)"
