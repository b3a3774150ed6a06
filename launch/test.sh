#!/usr/bin/env bash
# The test command: creates the environment if needed, lints, runs the suite.
#   bash launch/test.sh            # everything: before a commit, and what CI runs
#   bash launch/test.sh --fast     # the edit loop: every module's logic in-process, no test marked slow
#   bash launch/test.sh -k data    # extra arguments go to pytest
#   PYTHON=python3 bash launch/test.sh -m gpu   # a machine that has everything: no venv (env.sh)
# `slow` marks the tests that start real processes (ranks, launchers, signals, SLURM, a fresh
# interpreter), compile, or run the seed-size demo; --fast leaves them out. How long each takes,
# measured: the README's Set-up (the one place times are stated). The SLURM tests need a cluster:
# sudo bash launch/slurm_local.sh up.
fast=()
if [ "${1:-}" = --fast ]; then
  fast=(-m "not slow")
  shift
fi
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
if "$PY" -m ruff --version >/dev/null 2>&1; then
  "$PY" -m ruff check vae_dist tests launch
else
  echo "test.sh: ruff is not installed here: lint skipped" >&2
fi
# two pytest-xdist workers (TEST_WORKERS=0: one process), each test handed to the first free one;
# a later -n in the arguments wins
workers=()
[ "${TEST_WORKERS:-2}" != 0 ] && "$PY" -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-2}" --dist worksteal)
exec "$PY" -m pytest -q -p no:logging "${workers[@]}" "${fast[@]}" "$@"
