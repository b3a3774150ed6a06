#!/usr/bin/env bash
# The demo: sample data -> shards -> a short training run of the seed VAE -> pictures.
#   bash launch/demo.sh [--out runs/demo] [--steps N]
# How long it takes, measured: the README's Set-up (the one place times are stated).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$PY" -m vae_dist demo "$@"
