#!/usr/bin/env bash
# Multi-node training under SLURM: srun starts one training process per GPU (or, on a CPU
# partition, GPUS_PER_NODE processes per node); rank 0's node is the rendezvous point.
#   sbatch --nodes=4 launch/train_slurm.sh --data.shards=/shared/tin-shards --train.out_dir=/shared/runs/tin
#   GPUS_PER_NODE=2 sbatch --nodes=2 --gpus-per-node=0 --cpus-per-task=2 --partition=cpu launch/train_slurm.sh ...
#
# Environment: GPUS_PER_NODE (processes per node; default: the GPUs SLURM gave the node, else 1),
# MIXED_PRECISION (no|bf16|fp16; default: bf16 on GPUs, fp32 on CPUs), MAX_REQUEUES (3),
# MAIN_PORT, PYTHON (default: the project's .venv if there is one, else python3; nothing is
# installed here), STAGE_SHARDS=1 (copy the shards to node-local disk, $SLURM_TMPDIR or /tmp).
# Where wandb is installed, its service runs in this batch shell (see below) for the job's start.
#
# Preemption and time limits: SLURM sends SIGTERM 120 s ahead (--signal=TERM@120, or
# `scancel --signal=TERM JOB`); the ranks agree on a step, checkpoint it and exit 143; this
# script then requeues the job (`scontrol requeue`, at most MAX_REQUEUES times) and the next
# start resumes from that batch (train.resume=auto, the default). A run that reached its last
# step exits 0 and is not requeued. Output is appended across requeues. Exit codes: 0 done,
# 143/130 stopped by a signal and not requeued (cap reached), anything else the failure.
#SBATCH --job-name=vae-dist
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%j.out
set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "${BASH_SOURCE[0]}")/..}"
if [ -z "${SLURM_JOB_ID:-}" ]; then echo "vae-dist: error: train_slurm.sh runs under SLURM: submit it with sbatch (launch/train_single_node.sh runs on this machine)" >&2; exit 2; fi

PROCS=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
[ "$PROCS" -ge 1 ] 2>/dev/null || PROCS=1
CPUS=$(( ${SLURM_CPUS_PER_TASK:-1} / PROCS )); [ "$CPUS" -ge 1 ] || CPUS=1
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=$PWD/.venv/bin/python; else PYTHON=python3; fi
fi
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
RESTARTS=${SLURM_RESTART_COUNT:-0}
ARGS=("$@")
[ -n "${MIXED_PRECISION:-}" ] && ARGS+=("--train.precision=$MIXED_PRECISION")
NODES_WORD=nodes; [ "$SLURM_NNODES" = 1 ] && NODES_WORD=node
PROCS_WORD=processes; [ "$PROCS" = 1 ] && PROCS_WORD=process
echo "vae-dist: job $SLURM_JOB_ID start $((RESTARTS + 1)) on $SLURM_JOB_NODELIST: $SLURM_NNODES $NODES_WORD x $PROCS $PROCS_WORD"

if [ "${STAGE_SHARDS:-0}" = 1 ]; then
  src=$(printf '%s\n' "${ARGS[@]}" | sed -n 's/^--data.shards=//p' | tail -n 1)
  [ -n "$src" ] || { echo "vae-dist: error: STAGE_SHARDS=1 needs --data.shards=DIR" >&2; exit 2; }
  local_dir="${SLURM_TMPDIR:-/tmp}/vae-dist-shards-$SLURM_JOB_ID"
  srun --ntasks-per-node=1 bash -c "mkdir -p '$local_dir' && cp -r '$src'/. '$local_dir'/" || exit 1
  ARGS+=("--data.shards=$local_dir")  # the last override wins
fi

# The training arguments, quoted for the inner shell (none: nothing, not an empty argument)
QUOTED=""
[ ${#ARGS[@]} -gt 0 ] && QUOTED=$(printf '%q ' "${ARGS[@]}")

# W&B's service process (wandb-core), started by rank 0 inside the job step, would get the
# step's TERM with the training processes and exit at once, before they have logged their
# last rows and finished the run. One started here, in the batch shell (which SLURM's TERM
# does not reach: it signals the job steps), serves rank 0, which runs on this same node.
WANDB_OURS=""
if [ -z "${WANDB_SERVICE:-}" ] && token=$("$PYTHON" -m wandb beta core start --idle-timeout 0 2>/dev/null); then
  export WANDB_SERVICE=$token WANDB_OURS=1
fi

# One task per process, launched by SLURM itself (no launcher in between to die of the
# signal): each task turns SLURM's numbering into torch.distributed's environment. Each uses
# its CPUs for its own threads (OMP_NUM_THREADS; unset, accelerate warns once per rank).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$CPUS}
srun --ntasks-per-node="$PROCS" --ntasks=$((SLURM_NNODES * PROCS)) --cpus-per-task="$CPUS" --overcommit \
  --kill-on-bad-exit=1 bash -c "export RANK=\$SLURM_PROCID LOCAL_RANK=\$SLURM_LOCALID WORLD_SIZE=\$SLURM_NTASKS \
    LOCAL_WORLD_SIZE=$PROCS MASTER_ADDR=$MAIN_ADDR MASTER_PORT=$MAIN_PORT; \
    exec $PYTHON -m vae_dist train $QUOTED"
code=$?
[ -n "$WANDB_OURS" ] && "$PYTHON" -m wandb beta core stop >/dev/null 2>&1

if [ "$code" = 143 ] || [ "$code" = 130 ]; then
  if [ "$RESTARTS" -lt "${MAX_REQUEUES:-3}" ]; then
    echo "vae-dist: stopped by a signal with a checkpoint; requeueing job $SLURM_JOB_ID (restart $((RESTARTS + 1)) of ${MAX_REQUEUES:-3})"
    # SLURM holds a requeued job for its credential lifetime (CredExpire, 2 min by default)
    # before it is eligible again
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
  fi
  echo "vae-dist: stopped by a signal; not requeued: MAX_REQUEUES=${MAX_REQUEUES:-3} reached (resubmit to continue)"
fi
exit "$code"
