#!/usr/bin/env bash
# All three benchmarks on this machine; JSON + plots + tables into runs/bench/LABEL/ (git-ignored),
# or into $OUT when set (OUT=docs/bench/LABEL: the results to commit).
#   bash launch/bench.sh [LABEL] [options, e.g. --tiny --steps 5 --shards DIR --images DIR]
# Each benchmark gets the options it takes: step measures synthetic batches and takes none of
# the data options (--shards, --images, --threads, --batch-size, --prefetch); `vae-dist bench KIND --help`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
label=${1:-$(hostname)}; shift || true
out=${OUT:-runs/bench/$label}
mkdir -p "$out"
# step's arguments: all but the data options (and their values)
step_args=(); skip_value=0
for a in "$@"; do
  if [ "$skip_value" = 1 ]; then skip_value=0; continue; fi
  case "$a" in
    --shards=*|--images=*|--threads=*|--batch-size=*|--prefetch=*) ;;
    --shards|--images|--threads|--batch-size|--prefetch) skip_value=1 ;;
    *) step_args+=("$a") ;;
  esac
done
for what in data step e2e; do
  if [ "$what" = step ]; then extra=("${step_args[@]}"); else extra=("$@"); fi
  vae-dist bench "$what" --json "$out/$what.json" --plot "$out/$what.png" "${extra[@]}" | tee "$out/$what.txt"
done
echo "bench.sh: results in $out/"
