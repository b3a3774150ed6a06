"""Reading Tiny ImageNet in its released layout, from the extracted folder or the .zip.

    tiny-imagenet-200/wnids.txt                 one wnid per line; label id = line number
    tiny-imagenet-200/words.txt                 wnid<TAB>text (all of WordNet)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG
    tiny-imagenet-200/val/images/*.JPEG         labels in val/val_annotations.txt
    tiny-imagenet-200/test/images/*.JPEG        no labels

Files are read through a FileTree (data/tree.py): as bytes, never extracted.
"""

from __future__ import annotations

import posixpath
from pathlib import Path

from vae_dist.data.shards import safe_key
from vae_dist.data.tree import FileTree, Listing, Record
from vae_dist.errors import DataError

SPLITS = ("train", "val", "test")


def find_root(tree: FileTree) -> str | None:
    """The Tiny ImageNet root inside `tree`: the folder holding wnids.txt (the top or a folder
    right below it; in a zip, the shortest path that holds one). None: it is not Tiny ImageNet."""
    if tree.is_zip:
        hits = sorted((n for n in tree.names if posixpath.basename(n) == "wnids.txt"), key=len)
        return posixpath.dirname(hits[0]) if hits else None
    folders, files = tree.entries("")
    if "wnids.txt" in files:
        return ""
    return next((f for f in folders if "wnids.txt" in tree.entries(f)[1]), None)


class Source(FileTree):
    """A Tiny ImageNet root inside a folder or a zip; paths are relative to that root."""

    def __init__(self, location: str | Path):
        super().__init__(location)
        root = find_root(self)
        if root is None:
            where = f"zip: no wnids.txt in {self.location}" if self.is_zip else \
                f"folder: no wnids.txt in {self.location} or its subfolders"
            raise DataError(f"not a Tiny ImageNet {where}")
        self.root = root

    def read_text(self, rel: str) -> str:
        try:
            return super().read_text(rel)
        except OSError:
            raise DataError(f"not a Tiny ImageNet dataset: cannot read {rel} in {self.location}") from None


def listing(src: Source, splits: tuple[str, ...]) -> Listing:
    """The records of the asked-for splits, the classes and the files that cannot be labelled."""
    wnids, words = read_classes(src)
    out = Listing(layout={"name": "tinyimagenet", "val": "val/ (val_annotations.txt)", "presplit": True}, classes=wnids,
                  words=words)
    for split in splits:
        records, unlabelled = list_split(src, split, wnids)
        out.splits[split] = records
        out.rejected += unlabelled
    return out


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
