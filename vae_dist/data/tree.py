"""A source of images as `pack` reads it: a folder or a .zip, by '/'-separated paths below a root.

Nothing is extracted: files are read as bytes, so no archive member can write anywhere. A
folder is listed with os.scandir one folder at a time, sorted, so the same tree lists in the
same order on every machine; a zip's names are indexed once by folder.
"""

from __future__ import annotations

import os
import posixpath
import zipfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from vae_dist.errors import DataError

# a file this large is no image a VAE trains on (and reading it whole would cost the memory)
MAX_FILE_BYTES = 256 << 20
EXCLUDED = "the pack's output folder (inside the source: not read)"


@dataclass(frozen=True, slots=True)
class Record:
    """One file to pack (slots: a listing of ImageNet holds 1.3 M of them)."""

    path: str  # relative to the source root, '/'-separated
    key: str  # the file's stem made safe as a sample key; pack makes it unique
    label: int  # class id in label order; -1: no class (a flat folder, a test split)


def join(folder: str, name: str) -> str:
    """A relative path below `folder` ('' = the root)."""
    return posixpath.join(folder, name) if folder else name


def is_hidden(name: str) -> bool:
    """Dot files and folders (.DS_Store, .ipynb_checkpoints, .git) and a zip's __MACOSX folder."""
    return name.startswith(".") or name == "__MACOSX"


def _refuse_oversized(size: int) -> None:
    """Before a byte is read: a file over MAX_FILE_BYTES is named as unreadable (OSError)."""
    if size > MAX_FILE_BYTES:
        raise OSError(f"{size} bytes, more than an image may hold ({MAX_FILE_BYTES >> 20} MiB)")


class FileTree:
    """A folder or a zip; every path is relative to `root`, a folder inside it ('' = the top).

    In a folder, links are followed only to files inside it: a link to a folder is never
    followed (one out of the tree reads what is no part of it, one to a folder that holds it
    reads the tree again, and one to a folder elsewhere in the tree reads that folder's files a
    second time, in another class), nor a link to a file out of the tree. Such links, and the
    folder given to `exclude` (pack's output folder inside its source), are never listed: their
    paths and why go to `refused`, which pack reports as rejected."""

    def __init__(self, location: str | Path, root: str = "", exclude: str | Path | None = None):
        self.location = Path(location)
        if not self.location.exists():
            raise DataError(f"dataset not found: {self.location}")
        self.root = root
        self.refused: dict[str, str] = {}  # path (a folder's with a trailing '/') -> why it is not listed
        self._top = self.location.resolve()
        self._excluded = self._inside(exclude) if exclude is not None and self.location.is_dir() else None
        self._zip: zipfile.ZipFile | None = None
        if not self.location.is_dir():
            try:
                self._zip = zipfile.ZipFile(self.location)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"corrupt or unreadable zip {self.location}: {e}") from None
            self.names = [n for n in self._zip.namelist() if not n.endswith("/")]
            self._name_set = set(self.names)
            self._folders: dict[str, tuple[set, list]] | None = None

    @property
    def is_zip(self) -> bool:
        return self._zip is not None

    def _full(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if self.root and rel else self.root or rel

    def _index(self) -> dict[str, tuple[set, list]]:
        """folder -> (subfolder names, file names) of the zip, made once."""
        if self._folders is None:
            folders: dict[str, tuple[set, list]] = defaultdict(lambda: (set(), []))
            unsafe = set(self.unsafe_members())  # reported by pack, never listed or read
            for name in self.names:
                if name in unsafe:
                    continue
                parent, base = posixpath.split(name)
                folders[parent][1].append(base)
                while parent:  # every ancestor knows its subfolder, also without an entry of its own
                    up, sub = posixpath.split(parent)
                    folders[up][0].add(sub)
                    parent = up
            self._folders = dict(folders)
        return self._folders

    # -- reading -------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        """The file's bytes; OSError (with the reason) for a file that cannot or should not be read."""
        if self._zip is None:
            path = self.location / self._full(rel)
            _refuse_oversized(path.stat().st_size)
            return path.read_bytes()
        try:
            info = self._zip.getinfo(self._full(rel))
            _refuse_oversized(info.file_size)
            return self._zip.read(info)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, KeyError, NotImplementedError) as e:
            raise OSError(f"unreadable zip member: {e}") from None

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode("utf-8", errors="replace")

    def exists(self, rel: str) -> bool:
        if self._zip is None:
            return (self.location / self._full(rel)).exists()
        full = self._full(rel)
        return full in self._name_set or full in self._index()

    # -- listing -------------------------------------------------------------------------
    def entries(self, rel: str = "") -> tuple[list[str], list[str]]:
        """(subfolder names, file names) directly inside folder `rel`, each sorted; ([], []) if
        there is no such folder. A link to a file inside the tree counts as that file; the links
        the class docstring names, and the excluded folder, are left out (and go to `refused`)."""
        if self._zip is not None:
            folders, files = self._index().get(self._full(rel), (set(), []))
            return sorted(folders), sorted(files)
        folder = self.location / self._full(rel)
        folders, files = [], []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    path = join(rel, entry.name)
                    why = self._not_listed(entry, self._full(path))
                    if why:
                        self.refused[path + ("/" if why == EXCLUDED else "")] = why
                        continue
                    try:
                        (folders if entry.is_dir() else files).append(entry.name)
                    except OSError:  # a dangling link: a file the reader will name as unreadable
                        files.append(entry.name)
        except (FileNotFoundError, NotADirectoryError):
            return [], []
        return sorted(folders), sorted(files)

    def _inside(self, path: str | Path) -> str | None:
        """`path` as a '/'-separated path below the tree's top, or None where it is not inside it."""
        try:
            inside = Path(path).resolve().relative_to(self._top).as_posix()
        except ValueError:
            return None
        return None if inside == "." else inside

    def _not_listed(self, entry: os.DirEntry, full: str) -> str | None:
        """Why a folder entry is left out of the listing; None: it is listed."""
        if full == self._excluded:
            return EXCLUDED
        if not entry.is_symlink():
            return None
        try:
            target = Path(entry.path).resolve(strict=True)
        except (OSError, RuntimeError):  # dangling, or links in a circle: unreadable, as a file
            return None
        if not target.is_relative_to(self._top):
            return "link out of the source tree (not followed)"
        if not target.is_dir():
            return None  # a file inside the tree: read as that file
        if Path(entry.path).parent.resolve().is_relative_to(target):
            return "link loop: a link to a folder that holds it (not followed)"
        return "link to a folder elsewhere in the source tree (not followed: its files are read where they are)"

    def visible(self, rel: str, hidden: list[str] | None = None) -> tuple[list[str], list[str]]:
        """`entries(rel)` without the hidden ones, whose paths (a folder's with a trailing '/') go
        to `hidden` when given: they are reported, never read."""
        folders, files = self.entries(rel)
        if hidden is not None:
            hidden += [join(rel, f) + "/" for f in folders if is_hidden(f)] + [join(rel, f) for f in files if is_hidden(f)]
        return [f for f in folders if not is_hidden(f)], [f for f in files if not is_hidden(f)]

    def list_dir(self, rel: str) -> list[str]:
        """Relative paths of the files directly inside folder `rel`, sorted."""
        return [posixpath.join(rel, name) for name in self.entries(rel)[1]]

    def walk(self, rel: str, hidden: list[str]):
        """Every file below folder `rel` (nested folders too) as a relative path, in sorted order,
        streamed folder by folder. Hidden files and folders are not read: their paths (a folder's
        with a trailing '/') are appended to `hidden`. Links to folders are not followed (see the
        class); a folder reached twice all the same (a bind mount) is read once."""
        seen: set[tuple[int, int]] = set()
        stack = [rel]
        while stack:
            folder = stack.pop()
            if self._zip is None:
                st = os.stat(self.location / self._full(folder))
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            folders, files = self.visible(folder, hidden)
            yield from (join(folder, name) for name in files)
            stack += [join(folder, name) for name in reversed(folders)]  # popped in sorted order

    def unsafe_members(self) -> list[str]:
        """Zip members with absolute or '..' paths. They are never read, only reported."""
        if self._zip is None:
            return []
        return [n for n in self.names if n.startswith("/") or ".." in n.split("/") or ":" in n.split("/")[0]]

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


@dataclass
class Listing:
    """What a source holds, before any pixel is read: its layout (manifest.json's `layout`), the
    class names in label order, each split's records, and the files that will not be packed."""

    layout: dict
    classes: list[str]
    words: dict[str, str]  # class name -> readable text (Tiny ImageNet's words.txt; else the name)
    splits: dict[str, list[Record]] = field(default_factory=dict)
    rejected: list[dict] = field(default_factory=list)  # {path, reason}
