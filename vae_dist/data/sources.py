"""What `vae-dist pack` reads: Tiny ImageNet, or any folder (or .zip) of images, in four layouts.

    tinyimagenet   wnids.txt, train/<wnid>/images/, val/val_annotations.txt (the released layout)
    classes        SRC/<class>/**/*.<ext>: torchvision's ImageFolder; class = top-level folder,
                   labels in sorted order, nested folders belong to their top-level class
    flat           SRC/**/*.<ext>: images with no classes (label -1 everywhere)
    either, split  SRC/train/..., SRC/val/..., SRC/test/...: each split folder in the layout of
                   train/ (class folders, or images alone); val's classes are train's; a test/
                   of images alone has no labels (-1), as Tiny ImageNet's

`--layout auto` decides: wnids.txt makes Tiny ImageNet; a top-level train/ folder makes a
pre-split tree; folders at the top make class folders; images alone make a flat folder. A
nested tree with no classes is `--layout flat`. Without a val/ folder, val is a deterministic
sample of `val_fraction` of the images (a seeded draw from the sorted paths).

Every file in the tree is a candidate: the decoder, not the name, decides what is an image
(a PNG behind .jpg packs; readme.txt is rejected as "not an image"). Hidden files and folders
(.DS_Store, .ipynb_checkpoints, __MACOSX) are listed as rejected and not read, as are links
to folders and links out of the tree (data/tree.py says why) and pack's output folder where it
lies inside the source.

The listing holds every path before packing starts: the global shuffle needs them all. A
Record is ~200 bytes, so ImageNet's 1.28 M images list in ~250 MB.
"""

from __future__ import annotations

import random
from pathlib import Path

from vae_dist.data import tinyimagenet
from vae_dist.data.tree import FileTree, Listing, Record, join
from vae_dist.errors import DataError

LAYOUTS = ("auto", "tinyimagenet", "classes", "flat")
SPLIT_FOLDERS = ("train", "val", "test")


def open_source(location: str | Path, layout: str = "auto", exclude: str | Path | None = None) -> tuple[FileTree, str]:
    """(the tree, the layout it has): `layout` as asked, or as `auto` finds it. The folder
    `exclude` (pack's output, where it lies inside the source) is no part of it."""
    if layout not in LAYOUTS:
        raise DataError(f"--layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    tree = FileTree(location, exclude=exclude)
    root = tinyimagenet.find_root(tree)
    if layout == "tinyimagenet" or (layout == "auto" and root is not None):
        tree.close()
        return tinyimagenet.Source(location), "tinyimagenet"
    if tree.is_zip:
        tree.root = _zip_root(tree)
    folders, files = tree.visible("")
    if not folders and not files:
        raise DataError(f"no files in {location}: pack reads Tiny ImageNet, a folder of class folders, or a folder "
                        f"of images")
    if layout == "auto":  # a pre-split tree takes train/'s layout
        layout = _kind(tree, "train" if "train" in folders else "")
    return tree, layout


def _zip_root(tree: FileTree) -> str:
    """A zip of one folder (as `zip -r photos.zip photos/` makes) is read from inside that folder."""
    folders, files = tree.visible("")
    return folders[0] if len(folders) == 1 and not files else ""


def _kind(tree: FileTree, rel: str) -> str:
    """classes where the folder holds folders, flat where it holds only files."""
    return "classes" if tree.visible(rel)[0] else "flat"


def list_source(tree: FileTree, layout: str, splits: tuple[str, ...], val_fraction: float | None = None,
                seed: int = 0) -> Listing:
    """The Listing of `tree` in `layout` for the asked-for `splits`."""
    if layout == "tinyimagenet":
        if val_fraction is not None:
            raise DataError("--val-fraction does not apply to Tiny ImageNet: its val split is val/")
        return tinyimagenet.listing(tree, splits)
    fraction = 0.05 if val_fraction is None else val_fraction
    if not 0 <= fraction < 1:
        raise DataError(f"--val-fraction must be in [0, 1), got {fraction}")
    folders = tree.visible("")[0]
    presplit = "train" in folders
    if presplit and val_fraction is not None and "val" in folders:
        raise DataError(f"--val-fraction does not apply: {tree.location} has its own val/ folder")
    for split in splits:
        if split not in SPLIT_FOLDERS:
            raise DataError(f"unknown split '{split}' (choose from {', '.join(SPLIT_FOLDERS)})")
        if split == "test" and not (presplit and "test" in folders):
            raise DataError(f"--splits asks for test, but {tree.location} has no test/ folder beside train/")
    hidden: list[str] = []
    if layout == "classes":
        classes = tree.visible("train" if presplit else "")[0]
        if not classes:
            where = f"{tree.location}/train" if presplit else str(tree.location)
            raise DataError(f"--layout classes, but {where} holds no class folders")
    else:
        classes = []
    label_of = {c: i for i, c in enumerate(classes)}
    out = Listing(layout={"name": layout, "val": ""}, classes=classes, words={c: c for c in classes})

    def read(split_dir: str, split: str) -> list[Record]:
        if layout == "flat" or (split == "test" and not tree.visible(split_dir)[0]):  # test/ of images: no labels
            return [_record(p, -1) for p in tree.walk(split_dir, hidden)]
        records = []
        top_folders, top_files = tree.visible(split_dir, hidden)
        for name in top_files:
            out.rejected.append({"path": join(split_dir, name), "reason": "not in a class folder"})
        for name in top_folders:
            paths = tree.walk(join(split_dir, name), hidden)
            if name in label_of:
                records += [_record(p, label_of[name]) for p in paths]
            else:
                out.rejected += [{"path": p, "reason": f"class folder {name} is not in train/"} for p in paths]
        return records

    if presplit:
        for name in tree.visible("", hidden)[1]:
            out.rejected.append({"path": name, "reason": "beside the split folders: in no split"})
        for name in folders:
            if name not in SPLIT_FOLDERS:
                out.rejected.append({"path": name + "/", "reason": "a folder beside train/: in no split (not read)"})
        out.splits = {split: read(split, split) for split in splits if split != "val" or "val" in folders}
    elif "train" in splits or "val" in splits:
        out.splits["train"] = read("", "train")
    if "val" in splits and "val" not in out.splits:  # no val/ folder: a sample of the images
        pool = out.splits["train"] if "train" in out.splits else read("train", "train")
        train, out.splits["val"] = hold_out(pool, fraction, seed)
        if "train" in splits:
            out.splits["train"] = train
        else:
            out.splits.pop("train", None)
        out.layout["val"] = f"held out: {fraction:g} of the images (seed {seed})"
    else:
        out.layout["val"] = "val/" if "val" in out.splits else "none"
    if not out.splits.get("val"):  # --val-fraction 0: no val split (training then refuses to start)
        out.splits.pop("val", None)
        out.layout["val"] = "none"
    out.layout["presplit"] = presplit
    out.rejected += [{"path": p, "reason": "hidden file or folder (not read)"} for p in hidden]
    if not any(out.splits.values()):
        raise DataError(f"no images in {tree.location} ({len(out.rejected)} files not packed)")
    return out


def hold_out(records: list[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, val): round(fraction x N) records (at least 1 of 2 or more) drawn with `seed` from
    the records in their sorted listing order: the same files for the same tree and seed."""
    count = round(fraction * len(records))
    if fraction > 0 and len(records) >= 2:
        count = max(1, count)
    chosen = set(random.Random(f"{seed}-val-holdout").sample(range(len(records)), count))
    return ([r for i, r in enumerate(records) if i not in chosen], [r for i, r in enumerate(records) if i in chosen])


def _record(path: str, label: int) -> Record:
    return Record(path, tinyimagenet.sample_key(path), label)
