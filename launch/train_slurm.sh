#!/usr/bin/env bash
# Multi-node training under SLURM: one `accelerate launch` per node, each starting one
# process per GPU; rank 0's host is the rendezvous point.
#   sbatch --nodes=4 launch/train_slurm.sh --data.shards=/shared/tin-shards --train.out_dir=/shared/runs/tin
# STAGE_SHARDS=1 first copies the shards to node-local disk ($SLURM_TMPDIR or /tmp) on every
# node and trains from there. Preemption: SLURM sends SIGTERM 120 s before the limit; every
# rank checkpoints at the next step and exits; resubmit with --train.resume=auto (the default).
#SBATCH --job-name=vae-dist
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --signal=TERM@120
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}"
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
ARGS=("$@")

if [ "${STAGE_SHARDS:-0}" = 1 ]; then
  src=$(printf '%s\n' "${ARGS[@]}" | sed -n 's/^--data.shards=//p' | tail -n 1)
  [ -n "$src" ] || { echo "STAGE_SHARDS=1 needs --data.shards=DIR" >&2; exit 2; }
  local_dir="${SLURM_TMPDIR:-/tmp}/vae-dist-shards-$SLURM_JOB_ID"
  srun --ntasks-per-node=1 bash -c "mkdir -p '$local_dir' && cp -r '$src'/. '$local_dir'/"
  ARGS+=("--data.shards=$local_dir")  # the last override wins
fi

srun --kill-on-bad-exit=1 bash -c "accelerate launch --config_file accelerate_config.yaml \
  --num_machines $SLURM_NNODES --machine_rank \$SLURM_NODEID \
  --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --main_process_ip $MAIN_ADDR --main_process_port $MAIN_PORT --rdzv_backend static \
  -m vae_dist train $(printf '%q ' "${ARGS[@]}")"
