"""Reading Tiny ImageNet in its released layout, from the extracted folder or the .zip.

    tiny-imagenet-200/wnids.txt                 one wnid per line; label id = line number
    tiny-imagenet-200/words.txt                 wnid<TAB>text (all of WordNet)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG
    tiny-imagenet-200/val/images/*.JPEG         labels in val/val_annotations.txt
    tiny-imagenet-200/test/images/*.JPEG        no labels

Nothing is extracted: files are read as bytes, so no archive member can write anywhere.
"""

from __future__ import annotations

import posixpath
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vae_dist.data.shards import safe_key
from vae_dist.errors import DataError

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    path: str  # relative to the dataset root, '/'-separated
    key: str  # the file's stem made safe as a sample key (sample_key); pack makes it unique
    label: int  # index into wnids; -1 for test


class Source:
    """A Tiny ImageNet root inside a folder or a zip; paths are relative to that root."""

    def __init__(self, location: str | Path):
        self.location = Path(location)
        if not self.location.exists():
            raise DataError(f"dataset not found: {self.location}")
        self._zip: zipfile.ZipFile | None = None
        if self.location.is_dir():
            self.root = self._find_dir_root(self.location)
            self._names = None
        else:
            try:
                self._zip = zipfile.ZipFile(self.location)
            except (zipfile.BadZipFile, OSError) as e:
                raise DataError(f"corrupt or unreadable zip {self.location}: {e}") from None
            self._names = [n for n in self._zip.namelist() if not n.endswith("/")]
            self._name_set = set(self._names)
            self.root = self._find_zip_root(self._names)

    # -- locating the root -------------------------------------------------------------
    def _find_dir_root(self, path: Path) -> str:
        for cand in [path, *sorted(p for p in path.iterdir() if p.is_dir())]:
            if (cand / "wnids.txt").is_file():
                return str(cand)
        raise DataError(f"not a Tiny ImageNet folder: no wnids.txt in {path} or its subfolders")

    def _find_zip_root(self, names: list[str]) -> str:
        hits = sorted((n for n in names if posixpath.basename(n) == "wnids.txt"), key=len)
        if not hits:
            raise DataError(f"not a Tiny ImageNet zip: no wnids.txt in {self.location}")
        return posixpath.dirname(hits[0])

    # -- file access -------------------------------------------------------------------
    def _member(self, rel: str) -> str:
        return posixpath.join(self.root, rel) if self.root else rel

    def exists(self, rel: str) -> bool:
        if self._zip is None:
            return (Path(self.root) / rel).exists()
        return self._member(rel) in self._name_set

    def read_bytes(self, rel: str) -> bytes:
        if self._zip is None:
            return (Path(self.root) / rel).read_bytes()
        try:
            return self._zip.read(self._member(rel))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError) as e:
            raise OSError(f"unreadable zip member: {e}") from None

    def read_text(self, rel: str) -> str:
        try:
            return self.read_bytes(rel).decode("utf-8", errors="replace")
        except (OSError, KeyError):
            raise DataError(f"not a Tiny ImageNet dataset: cannot read {rel} in {self.location}") from None

    def list_dir(self, rel: str) -> list[str]:
        """Relative paths of the files directly inside folder `rel`, sorted."""
        if self._zip is None:
            folder = Path(self.root) / rel
            if not folder.is_dir():
                return []
            return sorted(f"{rel}/{p.name}" for p in folder.iterdir() if p.is_file())
        prefix = self._member(rel).rstrip("/") + "/"
        out = []
        for name in self._names:
            if name.startswith(prefix) and "/" not in name[len(prefix):]:
                out.append(rel + "/" + name[len(prefix):])
        return sorted(out)

    def unsafe_members(self) -> list[str]:
        """Zip members with absolute or '..' paths. They are never read, only reported."""
        if self._zip is None:
            return []
        return [n for n in self._names if n.startswith("/") or ".." in n.split("/") or ":" in n.split("/")[0]]

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def sample_key(rel: str) -> str:
    """'train/n01443537/images/n01443537_12.JPEG' -> 'n01443537_12': the file's stem with every
    character but letters, digits, '_' and '-' made '_' (a dot would split the WebDataset key,
    a space the .idx line). Not unique by itself: pack prefixes each sample's position."""
    return safe_key(posixpath.basename(rel).rsplit(".", 1)[0])


def read_classes(src: Source) -> tuple[list[str], dict[str, str]]:
    wnids = [w.strip() for w in src.read_text("wnids.txt").splitlines() if w.strip()]
    if not wnids:
        raise DataError(f"not a Tiny ImageNet dataset: wnids.txt in {src.location} is empty")
    if len(set(wnids)) != len(wnids):
        raise DataError(f"wnids.txt in {src.location} lists a class twice")
    words: dict[str, str] = {w: w for w in wnids}
    if src.exists("words.txt"):
        wanted = set(wnids)
        for line in src.read_text("words.txt").splitlines():
            wnid, _, text = line.partition("\t")
            if wnid in wanted:
                words[wnid] = text.strip()
    return wnids, words


def list_split(src: Source, split: str, wnids: list[str]) -> tuple[list[Record], list[dict]]:
    """The records of one split, and {path, reason} for files that cannot be labelled."""
    label_of = {w: i for i, w in enumerate(wnids)}
    rejected: list[dict] = []
    records: list[Record] = []
    if split == "train":
        for wnid in wnids:
            for rel in src.list_dir(f"train/{wnid}/images"):
                records.append(Record(rel, sample_key(rel), label_of[wnid]))
    elif split == "val":
        files = src.list_dir("val/images")
        if files and not src.exists("val/val_annotations.txt"):
            raise DataError(f"not a Tiny ImageNet dataset: val/val_annotations.txt missing in {src.location}")
        annotated: dict[str, str] = {}
        if files:
            for line in src.read_text("val/val_annotations.txt").splitlines():
                parts = line.split("\t")
                if len(parts) >= 2:
                    annotated[parts[0]] = parts[1]
        for rel in files:
            wnid = annotated.get(posixpath.basename(rel))
            if wnid is None:
                rejected.append({"path": rel, "reason": "no label in val/val_annotations.txt"})
            elif wnid not in label_of:
                rejected.append({"path": rel, "reason": f"label {wnid} is not in wnids.txt"})
            else:
                records.append(Record(rel, sample_key(rel), label_of[wnid]))
    elif split == "test":
        records = [Record(rel, sample_key(rel), -1) for rel in src.list_dir("test/images")]
    else:
        raise DataError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")
    return records, rejected
