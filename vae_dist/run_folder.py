"""Who may write a run folder, and where a run in it starts.

- `RunFolderLock`: one training run per folder. `train.out_dir/.lock` holds the holder's host,
  pid and start time; a second run exits at once naming the holder; a lock left behind by a
  dead process on this host is taken over with a warning. Rank 0 holds it for all ranks.
- `choose_start`: the checkpoint a run resumes from (`train.resume`: the newest that verifies,
  a given one that must verify, or none), and the rule that a fresh run never mixes with an
  old one: a folder that holds another run is refused, unless `train.overwrite=true` moves
  that run aside to `OUT_DIR.old-YYYYmmdd-HHMMSS` (nothing is deleted).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vae_dist import checkpoint as ckpt
from vae_dist.errors import UserError

LOCK = ".lock"
# What a run leaves in its folder; config.yaml alone (a run that failed at start) does not count.
RUN_FILES = ("metrics.jsonl", ckpt.WEIGHTS, "wandb_run_id")


def expand_out_dir(out_dir: str) -> str:
    """train.out_dir with `{wandb_run_id}` replaced by the W&B run id a sweep agent hands its
    trial (WANDB_RUN_ID), so that every trial of a sweep gets a run folder of its own."""
    if "{wandb_run_id}" not in out_dir:
        return out_dir
    run_id = os.environ.get("WANDB_RUN_ID")
    if not run_id:
        raise UserError(f"train.out_dir={out_dir} needs WANDB_RUN_ID (set by `wandb agent`), which is not set")
    return out_dir.replace("{wandb_run_id}", run_id)


def _warn(message: str) -> None:
    print(f"vae-dist: warning: {message}", file=sys.stderr, flush=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class RunFolderLock:
    """An exclusive lock file in the run folder (O_EXCL: works on local disks and NFS alike)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
              "slurm_job": os.environ.get("SLURM_JOB_ID")}
        for _ in range(2):  # the second try follows the takeover of a dead holder's lock
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise UserError(f"could not take the lock {self.path}")

    def _take_over_or_refuse(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            host, pid, since = holder["host"], int(holder["pid"]), holder.get("since", "?")
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (ValueError, KeyError, TypeError, OSError):
            # a holder that died while writing it; only a process that could not finish four
            # bytes of JSON leaves this, so it is not a live run
            _warn(f"taking over the unreadable lock {self.path}")
            self.path.unlink(missing_ok=True)
            return
        if host == socket.gethostname() and not _pid_alive(pid):
            _warn(f"taking over the lock of pid {pid} (since {since}), which is no longer running")
            self.path.unlink(missing_ok=True)
            return
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job") == job:  # this job's own run before a requeue, on any node
            _warn(f"taking over the lock of SLURM job {job}'s previous start (pid {pid} on {host})")
            self.path.unlink(missing_ok=True)
            return
        raise UserError(f"run folder {self.path.parent} is in use by pid {pid} on {host} since {since}; "
                        f"wait for it or choose another train.out_dir (if that process is gone, delete {self.path})")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


@dataclass
class Start:
    """Where a run starts: a verified checkpoint (None: step 0), and where an old run went."""

    checkpoint: Path | None = None
    moved_to: Path | None = None


def _old_run_files(run_dir: Path) -> list[str]:
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    n = len(ckpt.list_checkpoints(run_dir))
    return found + ([f"{n} checkpoint{'s' * (n > 1)}"] if n else [])


def _move_aside(run_dir: Path) -> Path:
    aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    aside.mkdir()
    for entry in run_dir.iterdir():
        if entry.name != LOCK:
            entry.rename(aside / entry.name)
    return aside


def choose_start(run_dir: Path, resume: str, overwrite: bool) -> Start:
    """Decided on rank 0 while it holds the lock; raises UserError with the one-line reason."""
    run_dir = Path(run_dir)
    start = Start()
    if overwrite and _old_run_files(run_dir):
        start.moved_to = _move_aside(run_dir)
    if resume not in ("auto", "none"):
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"train.resume: checkpoint not found: {path}")
        problem = ckpt.verify_checkpoint(path)
        if problem:
            raise UserError(f"train.resume: checkpoint {path} does not verify: {problem}")
        start.checkpoint = path
        return start
    if resume == "auto":
        start.checkpoint = ckpt.newest_verified_checkpoint(
            run_dir, on_skip=lambda path, problem: _warn(f"skipping checkpoint {path}: {problem}"))
        if start.checkpoint is not None:
            return start
    old = _old_run_files(run_dir)
    if old:
        over = f"train.overwrite=true (moves the old run to {run_dir.name}.old-TIMESTAMP)"
        if resume == "auto":
            raise UserError(f"run folder {run_dir} holds {', '.join(old)} but no checkpoint that verifies: "
                            f"start over with {over}, or pass train.resume=PATH")
        raise UserError(f"run folder {run_dir} holds another run ({', '.join(old)}): continue it with "
                        f"train.resume=auto, or start over with {over}")
    return start
