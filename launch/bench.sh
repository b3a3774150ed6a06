#!/usr/bin/env bash
# All three benchmarks on this machine; JSON + plots into docs/bench/<label>/.
#   bash launch/bench.sh [LABEL] [extra args for every benchmark, e.g. --shards DIR --images DIR]
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
label=${1:-$(hostname)}; shift || true
out="docs/bench/$label"
mkdir -p "$out"
for what in data step e2e; do
  vae-dist bench "$what" --json "$out/$what.json" --plot "$out/$what.png" "$@" | tee "$out/$what.txt"
done
