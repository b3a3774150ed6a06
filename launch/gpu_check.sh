#!/usr/bin/env bash
# The whole GPU check, offline, on a machine that already has torch (no venv, no registry, no
# network): phases env, tests, bench, tin20 (launch/gpu_check.py says what each does).
#   bash launch/gpu_check.sh h200 quick          # the headline in one call: no DALI needed (first, always)
#   bash launch/gpu_check.sh h200                # every phase but quick, in order
#   bash launch/gpu_check.sh h200 env tests      # some phases (each fits one 10-minute call)
#   bash launch/gpu_check.sh --smoke cpu         # the same phases at toy sizes, on a CPU
# Output: $OUT when set (the device tool's folder), else docs/bench/LABEL/.
# Packages the machine lacks: where .devwheels/ (docs/gpu_check.md says what it holds)
# travelled along, small.tar (webdataset, wandb) is installed, and DALI once all its dali-NN
# parts are there (the tar they make up reads to its end), into $VAE_DIST_SITE (default
# /tmp/vae-dist-site), which goes on PYTHONPATH with the checkout. Nothing is downloaded.
# Without them it runs what it can: the env phase says what is missing, the tests skip with
# the reason, the bench rows say "unavailable".
set -uo pipefail
# the call's clock starts here: the install below counts against GPU_CHECK_BUDGET_S too
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s.%N)}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
site=${VAE_DIST_SITE:-/tmp/vae-dist-site}
install() {  # install NAME WHEEL_DIR: the wheels into $site, once
  local stamp="$site/.installed-$1"
  [ -f "$stamp" ] && return 0
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" "$2"/*.whl \
      >/dev/null 2>"$site.$1.err"; then
    touch "$stamp"; echo "gpu_check: installed $1 into $site"
  else
    echo "gpu_check: installing $1 failed: $(tail -1 "$site.$1.err")" >&2
  fi
}
mkdir -p "$site"
if [ -f .devwheels/small.tar ]; then
  rm -rf /tmp/vae-dist-wheels-small && mkdir -p /tmp/vae-dist-wheels-small
  tar xf .devwheels/small.tar -C /tmp/vae-dist-wheels-small && install small /tmp/vae-dist-wheels-small
fi
quick=0
for a in "$@"; do [ "$a" = quick ] && quick=1; done
if [ "$quick" = 1 ]; then
  : # the headline needs no DALI: its install (a minute or more) would eat the call's budget
elif compgen -G ".devwheels/dali-*" >/dev/null; then
  if cat .devwheels/dali-* | tar t >/dev/null 2>&1; then
    rm -rf /tmp/vae-dist-wheels-dali && mkdir -p /tmp/vae-dist-wheels-dali
    cat .devwheels/dali-* | tar x -C /tmp/vae-dist-wheels-dali && install dali /tmp/vae-dist-wheels-dali
  else
    echo "gpu_check: .devwheels/dali-* do not make a whole tar yet ($(ls .devwheels/dali-* | wc -l) parts): no DALI" >&2
  fi
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_SILENT=true WANDB_MODE=${WANDB_MODE:-offline}
exec "$PY" launch/gpu_check.py "$@"
