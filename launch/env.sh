#!/usr/bin/env bash
# The project's Python, sourced by the other launch scripts. Two ways:
#   default       the virtual environment .venv, created and filled from pyproject.toml (with
#                 its dev extra) under launch/constraints.txt (the GPU machine's torch and
#                 accelerate) the first time, and again when either file changes
#   PYTHON=...    that interpreter as it is: no venv, nothing installed (a GPU machine with no
#                 network, a cluster's module-loaded Python); the checkout goes on PYTHONPATH
# Either way `$PY` is the interpreter and `vae-dist` runs the CLI.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  stamp=".venv/.installed-$(cat pyproject.toml launch/constraints.txt | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    [ -x .venv/bin/python ] || python3 -m venv .venv
    .venv/bin/python -m pip install -q --disable-pip-version-check -c launch/constraints.txt -e ".[dev]"
    touch "$stamp"
  fi
  export PATH="$ROOT/.venv/bin:$PATH"
  PY="$ROOT/.venv/bin/python"
fi
vae-dist() { "$PY" -m vae_dist "$@"; }
