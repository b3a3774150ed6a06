"""Durable file writes: what a crash or a power loss cannot leave half-written.

A rename is atomic but not durable by itself: without fsync the new name can reach the disk
before the data does, and after a power loss a "complete" file holds zeros. So data is
flushed before the rename, and the folder (which holds the name) after it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


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
    write_bytes_durable(tmp, data)
    replace_durable(tmp, path)
