#!/usr/bin/env bash
# All three benchmarks on this machine; JSON + plots into docs/bench/<label>/.
#   bash launch/bench.sh [LABEL] [extra args for data and e2e, e.g. --shards DIR --images DIR]
# (step measures synthetic batches: it takes none of them; `vae-dist bench KIND --help` lists each one's)
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
label=${1:-$(hostname)}; shift || true
out="docs/bench/$label"
mkdir -p "$out"
for what in data step e2e; do
  extra=("$@"); [ "$what" = step ] && extra=()
  vae-dist bench "$what" --json "$out/$what.json" --plot "$out/$what.png" "${extra[@]}" | tee "$out/$what.txt"
done
