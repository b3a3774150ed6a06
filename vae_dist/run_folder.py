"""Who may write a run folder, and where a run in it starts.

- `RunFolderLock`: one training run per folder. `train.out_dir/.lock` holds the holder's host,
  pid and start time; a second run exits at once naming the holder; a lock left behind by a
  dead process on this host (or by this SLURM job's previous start) is taken over with a warning.
  Rank 0 holds it for all ranks.
- `choose_start`: the checkpoint a run resumes from (`train.resume`: the newest that verifies,
  a given one that must verify, or none), and the rules that keep every run's work:
  - a fresh run never mixes with an old one: a folder that holds another run is refused,
    unless `train.overwrite=true` moves that run aside to `OUT_DIR.old-YYYYmmdd-HHMMSS`;
  - a run follows its own line of checkpoints: resuming from step S sets aside what lies beyond
    S (newer checkpoints, metrics rows after S) into `abandoned/after-step_S-TIME/`, so pruning
    (keep the newest `keep_last`) and a later `resume=auto` see only what this run resumed
    from and wrote since; nothing is deleted;
  - a requeued SLURM job continues its own run (`slurm_job_id` names the job that started it),
    whatever `train.resume` / `train.overwrite` asked of its first start.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from vae_dist import checkpoint as ckpt
from vae_dist.errors import UserError, counted
from vae_dist.files import new_dir_beside, output_dir, pid_alive, write_atomic
from vae_dist.model import VAEConfig

LOCK = ".lock"
SLURM_JOB_FILE = "slurm_job_id"  # the SLURM job whose run this folder holds
ABANDONED = "abandoned"  # what lay beyond a resumed checkpoint: abandoned/after-step_S-TIME/
METRICS = "metrics.jsonl"
# What a run leaves in its folder; config.yaml alone (a run that failed at start) does not count.
RUN_FILES = (METRICS, ckpt.WEIGHTS, "wandb_run_id")


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


class RunFolderLock:
    """An exclusive lock file in the run folder (O_EXCL: works on local disks and NFS alike)."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.held = False
        self.made: list[Path] = []  # the folders acquire made, deepest first
        self._ids: tuple | None = None  # (folder, lock file) as (device, inode): what `lost` compares

    def acquire(self) -> None:
        folder = self.path.parent.absolute()
        self.made = [d for d in (folder, *folder.parents) if not d.exists()]
        output_dir(self.path.parent, "train.out_dir")
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
            self._ids = (_file_id(folder), _file_id(self.path))
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
            if self._remove_if_unchanged(None):
                _warn(f"taking over the unreadable lock {self.path}")
            return
        if host == socket.gethostname() and not pid_alive(pid):
            if self._remove_if_unchanged(holder):
                _warn(f"taking over the lock of pid {pid} (since {since}), which is no longer running")
            return
        job = os.environ.get("SLURM_JOB_ID")
        if job and holder.get("slurm_job") == job:  # this job's own run before a requeue, on any node
            if self._remove_if_unchanged(holder):
                _warn(f"taking over the lock of SLURM job {job}'s previous start (pid {pid} on {host})")
            return
        raise UserError(f"run folder {self.path.parent} is in use by pid {pid} on {host} since {since}; "
                        f"wait for it or choose another train.out_dir (if that process is gone, delete {self.path})")

    def _remove_if_unchanged(self, holder: dict | None) -> bool:
        """Removes the lock judged stale, unless another process took it over meanwhile. The
        lock is renamed away first (atomic: of two takers only one gets it); if what it got is
        no longer the stale holder's (the other taker's fresh lock), it is put back."""
        grave = self.path.with_name(f"{LOCK}.stale-{os.getpid()}-{secrets.token_hex(3)}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return False  # the other taker removed it: try again
        try:
            got = json.loads(grave.read_text())
        except (ValueError, OSError):
            got = None
        if got != holder:
            try:
                os.link(grave, self.path)  # fails only where a third process holds it now
            except FileExistsError:
                pass
        grave.unlink(missing_ok=True)
        return got == holder

    def lost(self) -> str | None:
        """Why this run can no longer write its folder, None while it can: the folder (or the
        lock in it) deleted or replaced since `acquire` (an `rm -rf`, another run started over it),
        or the folder become read-only. A stat and an access call: cheap at every sync point."""
        if not self.held:
            return None
        folder = self.path.parent
        folder_id, lock_id = self._ids
        now_id = _file_id(folder)
        if now_id is None:
            return f"run folder {folder} was deleted while training"
        if now_id != folder_id:
            return f"run folder {folder} was replaced by another folder while training"
        if _file_id(self.path) != lock_id:
            return f"the lock {self.path} of this run was removed or replaced: another run may be writing {folder}"
        if not os.access(folder, os.W_OK):
            return f"run folder {folder} became read-only while training"
        return None

    def release(self) -> None:
        """Lets go of the folder; one this start made and left empty (it failed before writing
        anything) is removed, so a refused start leaves nothing behind. Only our own lock is
        removed (not one of a run that has since taken the path); one that cannot be removed (a
        read-only folder) stays, and the next start takes it over as a dead process's."""
        if self.held:
            if self._ids is not None and _file_id(self.path) == self._ids[1]:
                try:
                    self.path.unlink()
                except OSError:
                    pass
            self.held = False
            for folder in self.made:
                try:
                    folder.rmdir()  # only while empty
                except OSError:
                    break
            self.made = []


def _file_id(path: Path) -> tuple[int, int] | None:
    """(device, inode) of `path`: the same only for the very same file or folder; None where gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


@dataclass
class Start:
    """Where a run starts: a verified checkpoint (None: step 0), where an old run went, where
    what lay beyond the resumed checkpoint went, and why it starts there when that is not
    what was asked."""

    checkpoint: Path | None = None
    moved_to: Path | None = None
    set_aside: Path | None = None
    notes: list[str] = field(default_factory=list)

    def report(self, run_dir: Path) -> list[str]:
        """The lines that tell the user what this start did to the run folder."""
        lines = [f"moved the previous run in {run_dir} to {self.moved_to}"] if self.moved_to is not None else []
        lines += [f"vae-dist: {note}" for note in self.notes]
        if self.set_aside is not None:
            name = self.checkpoint.name
            lines.append(f"set aside what lay beyond {name} (later checkpoints, metrics rows) in {self.set_aside}: "
                         f"this run continues from {name}")
        return lines


def _old_run_files(run_dir: Path) -> list[str]:
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    n = len(ckpt.list_checkpoints(run_dir))
    return found + ([counted(n, "checkpoint")] if n else [])


def _move_aside(run_dir: Path) -> Path:
    aside = new_dir_beside(run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
    for entry in run_dir.iterdir():
        if entry.name != LOCK:
            entry.rename(aside / entry.name)
    return aside


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1  # a torn last line: kept where it is


def _set_aside_beyond(run_dir: Path, resumed: Path) -> Path | None:
    """Moves what lies beyond the resumed checkpoint's step S (other checkpoints at S or later,
    metrics rows after S) to abandoned/after-step_S-TIME/; returns that folder, None if nothing."""
    step = ckpt.saved_step(resumed)
    beyond = [p for p in ckpt.list_checkpoints(run_dir)
              if ckpt.checkpoint_step(p) >= step and p.resolve() != resumed.resolve()]
    metrics = run_dir / METRICS
    kept, later = [], []
    for line in metrics.read_text().splitlines(keepends=True) if metrics.is_file() else []:
        (later if _row_step(line) > step else kept).append(line)
    if not beyond and not later:
        return None
    aside = new_dir_beside(run_dir / ABANDONED / f"after-step_{step:07d}-{time.strftime('%Y%m%d-%H%M%S')}")
    for path in beyond:
        path.rename(aside / path.name)
    if later:
        write_atomic(aside / METRICS, "".join(later).encode())
        write_atomic(metrics, "".join(kept).encode())
    return aside


def own_slurm_job(run_dir: Path) -> str | None:
    """This SLURM job's id when the run in `run_dir` was started by this very job (a requeue)."""
    job = os.environ.get("SLURM_JOB_ID")
    record = Path(run_dir) / SLURM_JOB_FILE
    if job and record.is_file() and record.read_text().strip() == job:
        return job
    return None


def record_slurm_job(run_dir: Path) -> None:
    """Names the SLURM job that runs in `run_dir`, so its requeued starts continue this run."""
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        write_atomic(Path(run_dir) / SLURM_JOB_FILE, job.encode())


def _skip_warning(path: Path, problem: str) -> None:
    _warn(f"skipping checkpoint {path}: {problem}")


def _remove_partial_checkpoints(run_dir: Path) -> list[str]:
    """Removes the `.tmp-step_*` folders a crash (or a full disk) left half-written: no
    checkpoint is ever read from one, and they hold the space the next checkpoint needs."""
    notes = []
    for tmp in sorted(ckpt.checkpoint_dir(run_dir).glob(".tmp-step_*")):  # none where the folder is not
        shutil.rmtree(tmp, ignore_errors=True)
        notes.append(f"removed {tmp}, a checkpoint left half-written by an earlier start")
    return notes


def _refuse_other_architecture(path: Path, model: VAEConfig, explicit: bool) -> None:
    """A checkpoint of another architecture cannot be continued by this run: refused before
    anything in the folder moves, with what the user can do instead."""
    saved = ckpt.read_vae_config(path / ckpt.WEIGHTS)
    if saved == model:
        return
    run_dir = path.parent.parent
    instead = "train.resume=none with another train.out_dir" if explicit else \
        f"train.overwrite=true to start over (moves the old run to {run_dir.name}.old-TIMESTAMP), or another train.out_dir"
    raise UserError(f"checkpoint {path} holds another architecture: {ckpt.architecture_difference(saved, model)}; "
                    f"to continue it, train with its model.* values; for this model, {instead}")


def _refuse_other_data(path: Path, data: dict | None, other_data_ok: bool, notes: list[str]) -> None:
    """A checkpoint resumed on other shards than it was trained on, or on the same shards in another
    train order (data.shuffle, or its `auto` resolving otherwise: a set at a URL against another
    data.shard_cache_gb), would go on with another sample order while claiming to continue exactly:
    refused, naming both, unless the user asks for it (train.resume_other_data=true), which is said
    in the run's output and recorded in W&B."""
    saved = ckpt.read_trainer_state(path).get("data")
    if data is None or not isinstance(saved, dict):
        return  # a checkpoint of an older version records no data: nothing to compare
    if saved.get("digest") != data["digest"]:
        what = (f"checkpoint {path} was trained on the shards in {saved.get('shards')} (data {saved.get('digest')}); "
                f"data.shards={data['shards']} holds other data ({data['digest']})")
        refused = ("a resume there would not continue the same sample order; point data.shards at the checkpoint's "
                   "shards, or set train.resume_other_data=true to resume on these anyway")
        anyway = "resuming on them anyway"
    elif saved.get("order", data.get("order")) != data.get("order"):  # before issue 45 none recorded: the global one
        what = (f"checkpoint {path} was trained in the {saved['order']} order; this run's data.shuffle resolves to "
                f"{data.get('order')}")
        refused = ("a resume would not continue the same sample order; set data.shuffle (and data.shuffle_block) as "
                   "the checkpoint's run had them, or train.resume_other_data=true to resume in this order anyway")
        anyway = "resuming anyway"
    else:
        return
    if not other_data_ok:
        raise UserError(f"{what}: {refused}")
    notes.append(f"{what}: {anyway} (train.resume_other_data=true); the sample order differs from here on")


def choose_start(run_dir: Path, resume: str, overwrite: bool, model: VAEConfig, data: dict | None = None,
                 other_data_ok: bool = False) -> Start:
    """Decided on rank 0 while it holds the lock; raises UserError with the one-line reason.
    `model`: this run's architecture, which the checkpoint it resumes from must hold; `data`:
    the identity of this run's shards (ShardSet.identity), which must be the checkpoint's unless
    `other_data_ok` (train.resume_other_data)."""
    run_dir = Path(run_dir)
    start = Start(notes=_remove_partial_checkpoints(run_dir))

    def resume_from(path: Path, explicit: bool) -> Start:
        """The start from checkpoint `path`, once it holds this run's architecture and data; the
        checkpoints beyond it (damaged newer ones) and the metrics rows after it are set aside."""
        _refuse_other_architecture(path, model, explicit=explicit)
        _refuse_other_data(path, data=data, other_data_ok=other_data_ok, notes=start.notes)
        start.checkpoint = path
        start.set_aside = _set_aside_beyond(run_dir, path)
        return start

    job = own_slurm_job(run_dir)
    if job is not None:
        newest = ckpt.newest_verified_checkpoint(run_dir, on_skip=_skip_warning)
        if newest is not None:
            resume_from(newest, explicit=False)
            start.notes.append(f"SLURM job {job} was requeued: it continues its own run")
            return start
    if overwrite and _old_run_files(run_dir):
        start.moved_to = _move_aside(run_dir)
    if resume not in ("auto", "none"):
        path = Path(resume)
        if not path.is_dir():
            raise UserError(f"train.resume: checkpoint not found: {path}")
        problem = ckpt.verify_checkpoint(path)
        if problem:
            raise UserError(f"train.resume: checkpoint {path} does not verify: {problem}")
        return resume_from(path, explicit=True)
    if resume == "auto":
        newest = ckpt.newest_verified_checkpoint(run_dir, on_skip=_skip_warning)
        if newest is not None:
            return resume_from(newest, explicit=False)
    old = _old_run_files(run_dir)
    if old:
        over = f"train.overwrite=true (moves the old run to {run_dir.name}.old-TIMESTAMP)"
        if resume == "auto":
            raise UserError(f"run folder {run_dir} holds {', '.join(old)} but no checkpoint that verifies: "
                            f"start over with {over}, or pass train.resume=PATH")
        raise UserError(f"run folder {run_dir} holds another run ({', '.join(old)}): continue it with "
                        f"train.resume=auto, or start over with {over}")
    return start
