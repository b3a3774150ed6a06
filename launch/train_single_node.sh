#!/usr/bin/env bash
# All GPUs of one node, DDP + bf16 from accelerate_config.yaml, the VAE compiled:
#   bash launch/train_single_node.sh --data.shards=shards --train.out_dir=runs/tin
# NUM_GPUS overrides the count; MIXED_PRECISION=fp16|no overrides bf16.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ngpu=${NUM_GPUS:-$(nvidia-smi -L 2>/dev/null | wc -l)}
if [ "$ngpu" -lt 1 ]; then echo "train_single_node.sh: no GPU found (nvidia-smi -L lists none)" >&2; exit 2; fi
exec accelerate launch --config_file accelerate_config.yaml --num_processes "$ngpu" \
  --mixed_precision "${MIXED_PRECISION:-bf16}" -m vae_dist train "$@"
