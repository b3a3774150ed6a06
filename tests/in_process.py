"""`vae-dist ...` run inside the test process: what a user's process prints and returns, without
an interpreter start, a torch import and a model build per call (20-35 s of a 2-core machine's
time each; the command's own work here is a second or two).

What makes it the same run as `python -m vae_dist ...`:
- stdout and stderr are captured at the file descriptors, so C/C++ output (DALI, gloo, a
  forked worker's) lands in them in order with Python's, as it would in a real process;
- the environment is the call's for its duration, the working folder too;
- warnings are shown as a fresh process shows them (each once per place, DeprecationWarning
  hidden), not recorded by pytest, and their once-per-place memory is fresh for every call;
- Accelerate's process state (a singleton) is reset before and after, so each call builds its
  own Accelerator; signal handlers, if a call leaves any, are put back; W&B's service is
  stopped at the end, as a process's exit stops it, so its files are whole on disk;
- an exception that escapes `main` is a traceback on stderr and exit code 1, as in a process.
tests/test_cli_help.py checks these surroundings. What it cannot be: a second process (a rank,
a signal target, a launcher's child); tests of those keep a real one (`conftest.run_process`,
`launch_command`). On a GPU machine conftest.run_cli takes real processes throughout (a run
there sets process-wide CUDA state).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _captured_fds():
    """fd 1 and 2 (and sys.stdout/stderr on them) into two temp files; yields a list that holds
    their texts, [stdout, stderr], once the block has ended."""
    sys.stdout.flush()
    sys.stderr.flush()
    files = [tempfile.TemporaryFile(mode="w+b") for _ in range(2)]
    saved_fds = [os.dup(1), os.dup(2)]
    saved_streams = sys.stdout, sys.stderr
    texts: list[str] = []
    try:
        for fd, f in zip((1, 2), files):
            os.dup2(f.fileno(), fd)
        # line-buffered text streams on the captured fds: Python's writes and C's interleave
        sys.stdout = open(1, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")
        sys.stderr = open(2, "w", buffering=1, closefd=False, encoding="utf-8", errors="replace")
        yield texts
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        sys.stdout, sys.stderr = saved_streams
        for fd, saved in zip((1, 2), saved_fds):
            os.dup2(saved, fd)
            os.close(saved)
        for f in files:
            f.seek(0)
            texts.append(f.read().decode("utf-8", errors="replace"))
            f.close()


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def _end_wandb() -> None:
    """What a process's exit does to W&B: its service stops, once it has written every run's file
    to disk (wandb.finish returns before that; a test reads the file next)."""
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()


@contextlib.contextmanager
def process_like(env: dict[str, str]):
    """The surroundings of a fresh process for the block: `env` in the environment, fd 1 and 2
    captured, a fresh process's warnings shown on stderr. Yields [stdout, stderr], filled once
    the block has ended."""
    with _environment(env), _captured_fds() as texts, warnings.catch_warnings():
        # a fresh process's filters (DeprecationWarning hidden), shown on stderr; setting a
        # filter also voids every module's once-per-place memory, so this call sees its own
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: sys.stderr.write(
            warnings.formatwarning(message, category, filename, lineno, line))
        yield texts


def run_in_process(argv: list[str], env: dict[str, str], cwd=None) -> subprocess.CompletedProcess:
    from vae_dist.cli import main

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    old_cwd = os.getcwd()
    _reset_accelerate()
    with process_like(env) as texts:
        try:
            if cwd is not None:
                os.chdir(cwd)
            code = main(list(argv))
        except SystemExit as e:  # argparse's usage errors (2), --help (0)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # what the interpreter would print before exiting 1
            traceback.print_exc()
            code = 1
        finally:
            os.chdir(old_cwd)
            _end_wandb()
            _reset_accelerate()
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
    out, err = texts
    return subprocess.CompletedProcess(["vae-dist", *argv], code, out, err)
