#!/usr/bin/env bash
# `vae-dist bench data` and `bench e2e` with --shards URL, against a link we control: the sample
# set (10 classes x 1000 train images, 64x64) packed into small shards (250 images, ~0.9 MB each:
# 40 train shards, so a cache below the set's size really streams), served over HTTP on the
# loopback by tests/serve_shards.py (the test suite's FaultyHTTPServer in a process of its own).
# Measured twice: (a) as fast as the loopback goes, (b) throttled below what the loaders need.
#   bash launch/bench_remote.sh [OUT] [THROTTLE]
#     OUT        where the JSON and tables go (default runs/bench/remote, which git ignores;
#                docs/bench/cpu-2core-remote holds the committed ones)
#     THROTTLE   (b)'s rate in bytes/s per connection (default 250000; a streaming loader fetches
#                up to 4 shards at once, so its link carries up to 4x that)
#     E2E_THROTTLE  the same for (b)'s e2e run (default 25000: the CPU's training step needs far less
#                than its loaders alone)
# Extra options for every bench run go in BENCH_ARGS (e.g. BENCH_ARGS="--steps 20").
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out=${1:-runs/bench/remote}
throttle=${2:-250000}
e2e_throttle=${E2E_THROTTLE:-25000}
read -r -a extra <<< "${BENCH_ARGS:-}"
mkdir -p "$out"
work=$(mktemp -d)
server=
stop_server() { if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; server=; fi; }
trap 'stop_server; rm -rf "$work"' EXIT

vae-dist sample-data "$work/src" --train-per-class 1000 --val-per-class 50 --test 0 > /dev/null
vae-dist pack "$work/src" "$work/served/shards" --shard-size 250 > /dev/null

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
vae-dist bench e2e --shards "$url" --variants fast --json "$out/e2e.json" "${extra[@]}" | tee "$out/e2e.txt"
serve "$throttle"
vae-dist bench data --shards "$url" --json "$out/data-throttled.json" "${extra[@]}" | tee "$out/data-throttled.txt"
serve "$e2e_throttle"
vae-dist bench e2e --shards "$url" --variants fast --json "$out/e2e-throttled.json" "${extra[@]}" \
  | tee "$out/e2e-throttled.txt"
echo "bench_remote.sh: results in $out/"
