#!/usr/bin/env bash
# `vae-dist bench data` and `bench e2e` with --shards URL, against a link we control: the sample
# set (10 classes x 1000 train images, 64x64, 41 MB) packed into small shards (100 images, ~0.4 MB:
# 100 train shards, so a cache for a block of 16 and the prefetch really streams), served over
# HTTP on the loopback by tests/serve_shards.py (the suite's FaultyHTTPServer in its own process).
# Measured (a) as fast as the loopback goes: data with --prefetch 4 (data.shard_prefetch's default)
# and 16 (a whole data.shuffle_block ahead), e2e; (b) throttled below what the rows need.
#   bash launch/bench_remote.sh [OUT]
#     OUT            where the JSON and tables go (default runs/bench/remote, which git ignores;
#                    docs/bench/cpu-2core-remote holds the committed ones)
#   THROTTLE=B       (b)'s data rate, bytes/s per connection (default 500000; a streaming row fetches
#                    up to 4 shards at once, so its link carries up to 4x that)
#   E2E_THROTTLE=B   the same for (b)'s e2e run (default 50000: the CPU's training step needs
#                    far less than its loaders alone)
#   BENCH_ARGS=...   options for every run; THROTTLED_ARGS=... for (b)'s (default: shorter runs)
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out=${1:-runs/bench/remote}
throttle=${THROTTLE:-500000}
e2e_throttle=${E2E_THROTTLE:-50000}
read -r -a extra <<< "${BENCH_ARGS:-}"
read -r -a slow <<< "${THROTTLED_ARGS:---steps 10 --warmup 2 --repeats 2}"
mkdir -p "$out"
work=$(mktemp -d)
server=
stop_server() { if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; server=; fi; }
trap 'stop_server; rm -rf "$work"' EXIT

vae-dist sample-data "$work/src" --train-per-class 1000 --val-per-class 50 --test 0 > /dev/null
vae-dist pack "$work/src" "$work/served/shards" --shard-size 100 > /dev/null

serve() {  # serve $work/served at the rate $1 (bytes/s per connection; empty: unthrottled); sets $url
  stop_server
  "$PY" -m tests.serve_shards "$work/served" ${1:+--throttle "$1"} > "$work/url" &
  server=$!
  for _ in $(seq 100); do [ -s "$work/url" ] && break; sleep 0.1; done
  url="$(head -n1 "$work/url")shards/"
  echo "bench_remote.sh: serving the set at $url${1:+, throttled to $1 bytes/s per connection}"
}

serve ""
vae-dist bench data --shards "$url" --json "$out/data.json" "${extra[@]}" | tee "$out/data.txt"
vae-dist bench data --shards "$url" --prefetch 16 --json "$out/data-prefetch16.json" "${extra[@]}" \
  | tee "$out/data-prefetch16.txt"
vae-dist bench e2e --shards "$url" --variants fast --json "$out/e2e.json" "${extra[@]}" | tee "$out/e2e.txt"
serve "$throttle"
vae-dist bench data --shards "$url" --json "$out/data-throttled.json" "${slow[@]}" "${extra[@]}" \
  | tee "$out/data-throttled.txt"
serve "$e2e_throttle"
# blocks of 2 shards (200 images): the timed windows of a short run then cross blocks, each waiting
# on the link (with the default 16, all 1 600 images of a block arrive before its first batch, in
# the warm-up, and the windows read them from the cache)
printf 'data:\n  shuffle_block: 2\n' > "$work/block2.yaml"
vae-dist bench e2e --shards "$url" --variants fast --config "$work/block2.yaml" --json "$out/e2e-throttled.json" \
  "${slow[@]}" "${extra[@]}" | tee "$out/e2e-throttled.txt"
echo "bench_remote.sh: results in $out/"
