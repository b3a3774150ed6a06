#!/usr/bin/env bash
# The test command: creates the environment if needed, lints, runs the whole suite.
#   bash launch/test.sh            # everything (about 5 minutes on 2 CPU cores)
#   bash launch/test.sh -k data    # extra arguments go to pytest
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
ruff check vae_dist tests
exec python -m pytest -q -p no:logging "$@"
