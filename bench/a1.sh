#!/usr/bin/env bash
# A1: restore of a 1 GiB point from the bucket alone (`restore
# --from-archive`) against a plain parallel download of the same objects
# with boto3 — what `aws s3 cp --recursive` does — from the same
# S3-compatible server (moto on loopback). Prints both times and, last,
# the ratio download/restore (target ≥ 0.8). Both are timed as whole
# commands: process start, listing, index and manifest, transfers, files.
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/common.sh
size="${SIZE:-1G}"
start_moto
start_daemon <<TOML
[journal]
file_cache = "512M"
[retention]
max_bytes = "64M"
interval = "1s"
[archive]
url = "s3://bench/a1"
endpoint = "$s3_endpoint"
upload_after = "1s"
base_every = "1s"
TOML
tm volume create a1 --size "$size" --mode async >/dev/null
fio --name=fill --ioengine=nbd --uri="nbd://$nbd/a1" --rw=write --bs=1M --iodepth=8 \
    --size="$size" --refill_buffers --output=/dev/null
wait_archived a1
# A base version after the last fold: the point is (almost) all chunks.
sleep 5
wait_archived a1

cat >"$work/peer.py" <<'PY'
# The objects a restore of latest needs (newest base version's chunks and
# the segments after it), fetched 16 at a time and written to files.
import concurrent.futures, json, os, sys, time
import boto3, botocore.config
s3 = boto3.client("s3", endpoint_url=sys.argv[1],
                  config=botocore.config.Config(max_pool_connections=16))
out = sys.argv[2]
os.makedirs(out, exist_ok=True)
keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket="bench", Prefix="a1/groups/a1/")
        for o in p.get("Contents", [])]
index = max(k for k in keys if "/index.e" in k)
content = json.loads(s3.get_object(Bucket="bench", Key=index)["Body"].read())["content"]
base = content["bases"][-1]
manifest = json.loads(s3.get_object(Bucket="bench", Key="a1/" + base["key"])["Body"].read())["content"]
wanted = ["a1/groups/a1/chunks/" + c for v in manifest["volumes"] for c in v["chunks"] if c]
wanted += ["a1/" + s["key"] for s in content["segments"] if s["last_seq"] > base["seq"]]
def get(key):
    body = s3.get_object(Bucket="bench", Key=key)["Body"].read()
    with open(os.path.join(out, key.replace("/", "_")), "wb") as f:
        f.write(body)
    return len(body)
start = time.time()
with concurrent.futures.ThreadPoolExecutor(16) as pool:
    total = sum(pool.map(get, wanted))
print(f"{time.time() - start:.3f} {len(wanted)} {total}")
PY
# Alternate the two, three runs each, into fresh files; medians.
restores=() peers=()
for run in 1 2 3; do
  rm -f "$work/a1.img"
  start=$(date +%s.%N)
  "$bin" restore a1 --at latest --to "$work/a1.img" --from-archive s3://bench/a1 \
      --endpoint "$s3_endpoint" >/dev/null 2>&1
  restores+=("$(python3 -c "import time; print(f'{time.time() - $start:.3f}')")")
  rm -rf "$work/peer"
  # The whole command, as `time aws s3 cp --recursive` would count it.
  start=$(date +%s.%N)
  read -r transfer objects bytes < <("$moto_python" "$work/peer.py" "$s3_endpoint" "$work/peer")
  peers+=("$(python3 -c "import time; print(f'{time.time() - $start:.3f}')")")
  echo "run $run: restore --from-archive ${restores[-1]} s; boto3 parallel GET of the same $objects objects ($((bytes >> 20)) MiB) ${peers[-1]} s (transfers alone $transfer s)"
done
restore=$(printf '%s\n' "${restores[@]}" | sort -n | sed -n 2p)
peer_s=$(printf '%s\n' "${peers[@]}" | sort -n | sed -n 2p)
python3 -c "print(f'A1 restore vs parallel download ratio {$peer_s/$restore:.2f} (medians of 3: restore {$restore} s, download {$peer_s} s)')"
