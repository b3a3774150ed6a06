#!/usr/bin/env bash
# All GPUs of one node, DDP + bf16 from accelerate_config.yaml, the VAE compiled:
#   bash launch/train_single_node.sh --data.shards=shards --train.out_dir=runs/tin
# NUM_GPUS overrides the count; MIXED_PRECISION=fp16|no overrides bf16; PYTHON=... uses that
# interpreter as it is (see env.sh). On a machine without GPUs: launch/train_cpu_dev.sh.
# vae_dist.launcher is `accelerate launch` ending a failed rank (or a signal) in one line, not a traceback.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
fail() { echo "vae-dist: error: $*" >&2; exit 2; }
if [ -n "${NUM_GPUS:-}" ]; then
  [[ "$NUM_GPUS" =~ ^[0-9]+$ ]] || fail "NUM_GPUS must be a whole number, got '$NUM_GPUS'"
  ngpu=$NUM_GPUS
elif command -v nvidia-smi >/dev/null 2>&1; then
  ngpu=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
else
  fail "no GPU found: nvidia-smi is not installed (NUM_GPUS=N sets the count; launch/train_cpu_dev.sh trains on CPUs)"
fi
[ "$ngpu" -ge 1 ] || fail "no GPU found: ${NUM_GPUS:+NUM_GPUS=0}${NUM_GPUS:-nvidia-smi -L lists none} (launch/train_cpu_dev.sh trains on CPUs)"
case "${MIXED_PRECISION:-bf16}" in
  no|bf16|fp16) ;;
  *) fail "MIXED_PRECISION must be one of no, bf16, fp16, got '$MIXED_PRECISION'" ;;
esac
exec "$PY" -m vae_dist.launcher --config_file accelerate_config.yaml --num_processes "$ngpu" \
  --mixed_precision "${MIXED_PRECISION:-bf16}" -m vae_dist train "$@"
