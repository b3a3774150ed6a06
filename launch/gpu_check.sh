#!/usr/bin/env bash
# The whole GPU check, offline: phases env, tests, bench, tin20 (launch/gpu_check.py says what
# each does).
#   bash launch/gpu_check.sh h200 quick          # the headline in one call: no DALI needed (first, always)
#   bash launch/gpu_check.sh h200                # every phase but quick, in order
#   bash launch/gpu_check.sh h200 env tests      # some phases (each fits one 10-minute call)
#   bash launch/gpu_check.sh --smoke cpu         # the same phases at toy sizes, on a CPU
# Python: $PYTHON when set (as launch/env.sh: that interpreter as it is), else the project's
# .venv when there is one, else python3 (the GPU machine's: no venv, no registry, no network
# there), each only when it has what the phases import (NEEDED below; a one-line error names
# what $PYTHON lacks); where neither has it, launch/env.sh builds (or rebuilds) .venv once.
# Output: $OUT when set (the device tool's folder); else with --smoke a new folder of the run's
# own, runs/gpu-check/LABEL-DATE-PID/ (git-ignored); else docs/bench/LABEL/ (to be committed; a
# second run at the same time refuses it in one line). Each run works in a folder of its own,
# removed at the end (VAE_DIST_WORK=DIR: that folder, kept and reused).
# What is reused across runs on purpose lives in the per-user cache, one run at a time (a lock):
# ${XDG_CACHE_HOME:-~/.cache}/vae-dist/ (the installed packages below, the sample sets that bench
# and tin20 pack), or, with no writable home, $TMPDIR/vae-dist-cache-UID (private: mode 700).
# Packages the machine lacks: where .devwheels/ (docs/gpu_check.md says what it holds)
# travelled along, small.tar (webdataset, wandb) is installed, and DALI once all its dali-slim-NN
# parts (launch/pack_dali.sh) have arrived over one or more calls, into $VAE_DIST_SITE (default
# the cache's site/), which goes on PYTHONPATH with the checkout. Nothing is downloaded.
#   bash launch/gpu_check.sh h200 stash          # a call that only carries a DALI part
# Without them it runs what it can: the env phase says what is missing, the tests skip with
# the reason, the bench rows say "unavailable".
set -uo pipefail
# The call's clock (GPU_CHECK_BUDGET_S) starts here, wheels' install included; where this run
# builds .venv first (minutes, a fresh clone only) it starts again after the build, and says so.
t0_given=${GPU_CHECK_T0:-}
export GPU_CHECK_T0=${GPU_CHECK_T0:-$(date +%s.%N)}
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# what the phases import (their parts run vae_dist, accelerate and pytest): no more than the GPU
# machine's python3 has (tqdm only on a terminal); DALI, webdataset and wandb are optional: the
# phases say when they are missing
NEEDED="torch torchvision accelerate numpy PIL yaml matplotlib safetensors skimage pytest"
lacks() {  # lacks PYTHON: the needed modules it cannot import, by name ("" when it has them all)
  "$1" -c "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None))" \
    $NEEDED 2>/dev/null || echo "(it does not run)"
}
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
  missing=$(lacks "$PY")
  [ -z "$missing" ] || { echo "gpu_check: PYTHON=$PY lacks $missing: choose an interpreter that has them, or unset PYTHON to use the project's .venv (launch/env.sh builds it)" >&2; exit 2; }
else
  PY=
  if [ -x .venv/bin/python ]; then
    missing=$(lacks .venv/bin/python)
    if [ -z "$missing" ]; then PY=$PWD/.venv/bin/python
    else  # its stamp would tell env.sh it is built
      echo "gpu_check: .venv lacks $missing (a build cut short?): building it again"
      rm -f .venv/.installed-*
    fi
  fi
  sys_missing=$( [ -x .venv/bin/python ] || lacks python3 )  # python3 counts only where there is no .venv
  if [ -z "$PY" ] && [ ! -x .venv/bin/python ] && [ -z "$sys_missing" ]; then
    PY=python3  # the GPU machine's own (no venv, no registry there)
  fi
  if [ -z "$PY" ]; then
    [ -x .venv/bin/python ] || echo "gpu_check: python3 lacks $sys_missing and there is no .venv: building the project's environment (launch/env.sh, once; PYTHON=... chooses an interpreter instead)"
    built=$(date +%s)
    # a child shell: env.sh's set -e holds there (on the left of || in this one it would not, and a
    # failed pip would still stamp .venv as built)
    bash -c 'source launch/env.sh' || { echo "gpu_check: launch/env.sh could not build .venv (above): set PYTHON= to an interpreter that has $NEEDED" >&2; exit 2; }
    missing=$(lacks .venv/bin/python)
    [ -z "$missing" ] || { echo "gpu_check: .venv, as launch/env.sh built it, lacks $missing: set PYTHON= to an interpreter that has them" >&2; exit 2; }
    PY=$PWD/.venv/bin/python
    if [ -z "$t0_given" ]; then
      GPU_CHECK_T0=$(date +%s.%N)
      echo "gpu_check: built .venv in $(( $(date +%s) - built )) s; the call's clock (GPU_CHECK_BUDGET_S) starts now, after it"
    fi
  fi
fi
cache_home=${XDG_CACHE_HOME:-${HOME:+$HOME/.cache}}
cache=${cache_home:+$cache_home/vae-dist}
if [ -z "$cache" ] || ! mkdir -p "$cache" 2>/dev/null || [ ! -w "$cache" ]; then  # no home to write to
  fallback="${TMPDIR:-/tmp}/vae-dist-cache-$(id -u)"
  echo "gpu_check: cannot write ${cache:-a cache without HOME} (no writable home): the cache is $fallback (XDG_CACHE_HOME= chooses)"
  cache=$fallback
  mkdir -m 700 "$cache" 2>/dev/null
  # a name anyone could have made first: use it only when it is this user's own, private folder
  # (its site/ goes first on PYTHONPATH)
  if [ -L "$cache" ] || [ ! -d "$cache" ] || [ ! -O "$cache" ] || [ "$(stat -c %a "$cache")" != 700 ]; then
    echo "gpu_check: $cache is not a private folder of this user (a link, another owner, or not mode 700): refusing it; set XDG_CACHE_HOME to a writable folder" >&2
    exit 2
  fi
fi
export VAE_DIST_CACHE=$cache  # gpu_check.py keeps its reused sample sets there
site=${VAE_DIST_SITE:-$cache/site}
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
mkdir -p "$site" || { echo "gpu_check: cannot make $site (set XDG_CACHE_HOME or VAE_DIST_SITE to a writable folder)" >&2; exit 2; }
# one run at a time installs into the site (two at once would race on it); released before the phases
exec 9>>"$site.lock"  # appending: the file keeps its holder's pid until the lock is ours
if ! command -v flock >/dev/null; then
  echo "gpu_check: no flock(1) here (util-linux): the installs into $site are not locked against another run"
elif ! flock -n 9; then
  echo "gpu_check: waiting for another run (pid $(cat "$site.lock" 2>/dev/null || echo unknown)) that holds $site.lock"
  flock 9
fi
echo $$ >"$site.lock"
reused=$(cd "$site" && ls -A | sed -n 's/^\.installed-//p' | tr '\n' ' ')  # installed by an earlier run
carried=${GPU_CHECK_DEVWHEELS:-.devwheels}  # what travelled with this call
if [ -f "$carried/small.tar" ] && [ ! -f "$site/.installed-small" ]; then
  wheels=$(mktemp -d "${TMPDIR:-/tmp}/vae-dist-wheels.XXXXXX")  # this run's own, removed after
  tar xf "$carried/small.tar" -C "$wheels" && install small "$wheels"
  rm -rf "$wheels"
fi
# DALI travels as launch/pack_dali.sh's parts, one per call (docs/gpu_check.md: the DALI window):
# every call stashes the parts it carried on the machine, and once they make a whole archive the
# installed tree is unpacked into $site (no pip: seconds). `quick` needs no DALI and installs none.
# the stash lives in the checkout (git-ignored), which a warm device machine keeps between calls:
# private to this checkout, never a folder that other runs on the machine share
stash=${GPU_CHECK_DALI_STASH:-$PWD/.dali-stash}
if compgen -G "$carried/dali-slim-*" >/dev/null; then
  mkdir -p "$stash" && cp "$carried"/dali-slim-* "$stash"/
  echo "gpu_check: stashed $(ls "$carried"/dali-slim-* | xargs -n1 basename | tr '\n' ' ')in $stash ($(ls "$stash" | wc -l) parts there)"
fi
quick=0
for a in "$@"; do
  [ "$a" = quick ] && quick=1
  [ "$a" = stash ] && exit 0  # the part is on the machine; the next call brings the next one
done
if [ "$quick" = 0 ] && [ ! -f "$site/.installed-dali" ] && compgen -G "$stash/dali-slim-*" >/dev/null; then
  "$PY" - "$stash" "$site" <<'PYEOF' && touch "$site/.installed-dali"
import glob, io, lzma, os, shutil, sys, tarfile, time
stash, site = sys.argv[1:3]
parts = sorted(glob.glob(os.path.join(stash, "dali-slim-*")))

class Parts(io.RawIOBase):  # the parts read as one stream, in order
    def __init__(self, paths):
        self.files = [open(p, "rb") for p in paths]
    def readable(self):
        return True
    def readinto(self, buf):
        while self.files:
            n = self.files[0].readinto(buf)
            if n:
                return n
            self.files.pop(0).close()
        return 0

t0, tmp = time.time(), site + ".dali-partial"
shutil.rmtree(tmp, ignore_errors=True)
try:
    with tarfile.open(fileobj=io.BufferedReader(Parts(parts), 1 << 20), mode="r|xz") as tar:
        tar.extractall(tmp, filter="data")
except (EOFError, lzma.LZMAError, tarfile.TarError, OSError) as e:
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"gpu_check: the {len(parts)} DALI parts in {stash} do not make a whole archive yet ({e}): no DALI", file=sys.stderr)
    sys.exit(1)
built = glob.glob(os.path.join(tmp, "nvidia", "dali", "backend_impl.cpython-*.so"))
mine = f"cpython-{sys.version_info.major}{sys.version_info.minor}-"
if built and not any(mine in b for b in built):  # launch/pack_dali.sh keeps one Python's modules (3.12)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"gpu_check: the DALI parts in {stash} hold DALI for {os.path.basename(built[0]).split('.')[1]}, not "
          f"this Python {sys.version.split()[0]}: no DALI", file=sys.stderr)
    sys.exit(1)
shutil.copytree(tmp, site, dirs_exist_ok=True)
shutil.rmtree(tmp)
print(f"gpu_check: installed DALI from {len(parts)} parts into {site} in {time.time() - t0:.0f} s")
PYEOF
fi
[ -n "$reused" ] && echo "gpu_check: reusing what an earlier run installed in $site: ${reused% }"
exec 9>&-  # the lock's end
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_SILENT=true WANDB_MODE=${WANDB_MODE:-offline}
exec "$PY" launch/gpu_check.py "$@"
