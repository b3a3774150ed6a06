"""Durable file writes: what a crash or a power loss cannot leave half-written.

A rename is atomic but not durable by itself: without fsync the new name can reach the disk
before the data does, and after a power loss a "complete" file holds zeros. So data is
flushed before the rename, and the folder (which holds the name) after it.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from vae_dist.errors import UserError


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """Flushes a folder's entries (new names, renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durable(path: Path, data: bytes) -> dict:
    """Writes and fsyncs `data`; returns its size and sha256 (the record a checkpoint keeps)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def replace_durable(src: Path, dst: Path) -> None:
    """os.replace, with the data flushed before and the folder entry after."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def write_atomic(path: Path, data: bytes) -> None:
    """`data` at `path` whole or not at all: written durably under a temporary name, then renamed."""
    tmp = Path(path).with_name(Path(path).name + ".partial")
    try:
        write_bytes_durable(tmp, data)
        replace_durable(tmp, path)
    except BaseException:  # a full disk, a SIGTERM (Terminated) as it was written: no half file left beside it
        tmp.unlink(missing_ok=True)
        raise


def output_dir(path: str | Path, what: str) -> Path:
    """The folder `path`, made with its parents and proven writable; a file in the way, a parent
    that cannot be made or a folder that cannot be written (a read-only mount) is a one-line
    error naming `what` the folder is for. Called before the work that fills it."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder: choose another path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot make {what} {path}: {e.strerror or e}") from None
    try:
        probe_writable(path)
    except OSError as e:
        raise UserError(f"cannot write into {what} {path}: {e.strerror or e}") from None
    return path


def output_file(path: str | Path, what: str) -> Path:
    """`path` as a file about to be written: not a folder, its folder made (with its parents)
    and writable, an existing file replaceable. Called before the work that fills it, so a
    read-only folder is a one-line error naming `what` the file is for, not a traceback after
    the work."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder: name the file to write")
    try:
        if path.parent.exists() and not path.parent.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        path.parent.mkdir(parents=True, exist_ok=True)
        probe_writable(path.parent)
        if path.exists() and not os.access(path, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as e:
        raise UserError(f"cannot write {what} {path}: {e.strerror or e}") from None
    return path


@contextmanager
def writing(path: str | Path, what: str):
    """Writes to `path` in the block; one that fails anyway (a disk filled, a folder made
    read-only meanwhile) is a one-line error naming `what` it was for."""
    try:
        yield
    except OSError as e:
        raise UserError(f"cannot write {what} {path}: {e.strerror or e}") from None


def probe_writable(folder: Path) -> None:
    """Creates and removes a file in `folder`: raises the OSError a write there would. A real
    write, since permission bits do not tell (root writes past them; a read-only mount, a
    network file system's own rules, a full inode table refuse all the same)."""
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".vae-dist-write-test-"):
        pass


def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs: the holder of a lock file or a staging folder that
    names it (a dead one's may be taken over or removed)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def new_dir_beside(base: Path) -> Path:
    """A new, empty folder named `base`, or `base-2`, `base-3`, ... where that is taken (two
    runs that move things aside within the same second each get their own)."""
    for n in range(1, 1000):
        candidate = base if n == 1 else base.with_name(f"{base.name}-{n}")
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            continue
    raise UserError(f"could not make a new folder beside {base}: 999 are taken")
