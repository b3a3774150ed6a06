#!/usr/bin/env bash
# A real 2-process DDP run on a CPU machine (gloo), for development:
#   bash launch/train_cpu_dev.sh --data.shards=runs/demo/shards --train.out_dir=runs/dev --train.max_steps=100
# `--multi_gpu` is what makes accelerate start a process group; vae-dist then picks gloo
# because there is no CUDA. fp32: bf16 autocast on most CPUs is many times slower.
# NUM_PROCESSES sets the count; vae_dist.launcher is `accelerate launch` ending a failed rank in
# one line, not a traceback (a signal to it too: passed on to the ranks, 30 s to checkpoint).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" -m vae_dist.launcher --multi_gpu --num_processes "${NUM_PROCESSES:-2}" --num_machines 1 \
  --mixed_precision no --dynamo_backend no -m vae_dist train --model.compile=false "$@"
