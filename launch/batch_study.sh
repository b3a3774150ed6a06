#!/usr/bin/env bash
# The val ELBO at global batch 64, 256 and 1024 with the README's lr rule (lr = 1e-3 * sqrt(B / 64),
# a linear warm-up over a tenth of the steps), the same epochs; then batch 1024 with 4x the epochs.
# docs/scaling.md's "how large a batch" numbers come from this (on a CPU: a small sample set and
# the seed's layout at half width, so that it runs in minutes).
#   bash launch/batch_study.sh [OUT_DIR] [EPOCHS] [extra train args]
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out=${1:-runs/batch_study}; epochs=${2:-5}
shift $(( $# < 2 ? $# : 2 ))
data="$out/data"
if [ ! -f "$data/shards/manifest.json" ]; then
  vae-dist sample-data "$data/src" --train-per-class 400 --val-per-class 50 --test 0
  vae-dist pack "$data/src" "$data/shards"
fi
train_images=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['splits']['train']['count'])" "$data/shards/manifest.json")
run() {  # run BATCH EPOCHS [extra train args]
  local batch=$1 ep=$2 steps warmup lr
  shift 2
  steps=$(( train_images / batch * ep )); warmup=$(( steps / 10 > 0 ? steps / 10 : 1 ))
  lr=$("$PY" -c "print(1e-3 * ($batch / 64) ** 0.5)")
  vae-dist train --data.shards="$data/shards" --train.out_dir="$out/b${batch}_e${ep}" --train.overwrite=true \
    --model.widths=[32,64,128,256] --train.batch_size="$batch" --train.epochs="$ep" --optim.lr="$lr" \
    --optim.warmup_steps="$warmup" --train.precision=no --train.eval_every=0 --train.checkpoint_every=0 \
    --log.log_every=10 --log.image_every=100000 --log.wandb_mode=disabled "$@" | grep -E "^(training|eval)" | tail -2
}
for batch in 64 256 1024; do run "$batch" "$epochs" "$@"; done
run 1024 $(( epochs * 4 )) "$@"
"$PY" - "$out" <<'PY'
import json, sys
from pathlib import Path
print("\n| global batch | epochs | optimizer steps | lr | val loss | val bits/dim |\n|---|---|---|---|---|---|")
runs = sorted(Path(sys.argv[1]).glob("b*_e*"), key=lambda p: (int(p.name[1:].split("_e")[0]), int(p.name.split("_e")[1])))
for run in runs:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val, train = [r for r in rows if r.get("split") == "val"][-1], [r for r in rows if "split" not in r][-1]
    batch, epochs = run.name[1:].split("_e")
    print(f"| {batch} | {epochs} | {val['step']} | {train['lr']:.1e} | {val['loss']:.1f} | {val['bpd']:.3f} |")
PY
