#!/usr/bin/env bash
# The val ELBO at global batch 64, 256 and 1024 with the README's lr rule (lr = 1e-3 * sqrt(B / 64),
# a linear warm-up over a tenth of the steps), the same epochs; then batch 1024 with 4x the epochs.
# docs/scaling.md's "how large a batch" numbers come from this (on a CPU: a small sample set and
# the seed's layout at half width, so that it runs in minutes).
#   bash launch/batch_study.sh [OUT_DIR] [EPOCHS] [extra train args]
#   RUNS="64:10:1e-3 512:10:8e-3" bash launch/batch_study.sh runs/lr_study   # BATCH:EPOCHS:LR runs instead
# (launch/configs/throughput.yaml's lr rule comes from such a run: docs/scaling.md)
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
out=${1:-runs/batch_study}; epochs=${2:-5}
shift $(( $# < 2 ? $# : 2 ))
data="$out/data"
if [ ! -f "$data/shards/manifest.json" ]; then
  vae-dist sample-data "$data/src" --train-per-class 400 --val-per-class 50 --test 0
  vae-dist pack "$data/src" "$data/shards"
fi
train_images=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['splits']['train']['count'])" "$data/shards/manifest.json")
run() {  # run BATCH EPOCHS LR [extra train args]
  local batch=$1 ep=$2 lr=$3 steps warmup
  shift 3
  steps=$(( train_images / batch * ep )); warmup=$(( steps / 10 > 0 ? steps / 10 : 1 ))
  vae-dist train --data.shards="$data/shards" --train.out_dir="$out/b${batch}_e${ep}_lr${lr}" --train.overwrite=true \
    --model.widths=[32,64,128,256] --train.batch_size="$batch" --train.epochs="$ep" --optim.lr="$lr" \
    --optim.warmup_steps="$warmup" --train.precision=no --train.eval_every=0 --train.checkpoint_every=0 \
    --log.log_every=10 --log.image_every=100000 --log.wandb_mode=disabled "$@" | grep -E "^(training|eval)" | tail -2
}
sqrt_rule() { "$PY" -c "print(f'{1e-3 * ($1 / 64) ** 0.5:.1e}')"; }  # the README's rule
default_runs="64:$epochs:$(sqrt_rule 64) 256:$epochs:$(sqrt_rule 256) 1024:$epochs:$(sqrt_rule 1024) 1024:$(( epochs * 4 )):$(sqrt_rule 1024)"
for spec in ${RUNS:-$default_runs}; do
  IFS=: read -r batch ep lr <<< "$spec"
  run "$batch" "$ep" "$lr" "$@"
done
"$PY" - "$out" <<'PY'
import json, sys
from pathlib import Path
print("\n| global batch | epochs | optimizer steps | lr | val loss | val bits/dim |\n|---|---|---|---|---|---|")
def key(run):
    batch, rest = run.name[1:].split("_e")
    epochs, lr = rest.split("_lr")
    return int(batch), int(epochs), float(lr)


runs = sorted(Path(sys.argv[1]).glob("b*_e*_lr*"), key=key)
for run in runs:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val, train = [r for r in rows if r.get("split") == "val"][-1], [r for r in rows if "split" not in r][-1]
    batch, epochs, _ = key(run)
    print(f"| {batch} | {epochs} | {val['step']} | {train['lr']:.1e} | {val['loss']:.1f} | {val['bpd']:.3f} |")
PY
