"""`vae-dist pack`: Tiny ImageNet or any folder of images (a folder or a zip) -> shuffled
WebDataset shards + manifest.json. The layouts it reads are data/sources.py's.

Every image is decoded once in a worker process (all cores), made RGB SxS, and written in
a globally shuffled order. Unreadable files go to manifest['rejected'] with the reason.
Output is staged in a hidden folder and swapped in at the end, so a crash never leaves a
half-written shard that looks complete, and packing again replaces the old result whole.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import random
import shutil
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vae_dist.data import available_cores
from vae_dist.data.images import to_shard_jpeg
from vae_dist.data.shards import MANIFEST, ShardWriter, shard_name, write_json_atomic
from vae_dist.data.sources import list_source, open_source
from vae_dist.data.tree import FileTree, Record
from vae_dist.errors import DataError, counted
from vae_dist.files import output_dir

# the VAE's stride-2 convs halve the image 4 times (the seed's; more layers need more)
SIZE_STEP, MIN_SIZE, MAX_SIZE = 16, 16, 512


@dataclass
class PackOptions:
    shard_size: int = 5000
    workers: int = 0  # 0: all cores
    seed: int = 0
    splits: tuple[str, ...] = ("train", "val")
    image_size: int = 64
    quality: int = 95
    keep_source: bool = True  # keep bytes that already are RGB SxS baseline JPEGs
    layout: str = "auto"  # auto | tinyimagenet | classes | flat (data/sources.py)
    val_fraction: float | None = None  # without a val folder: this share of the images is val; none: 0.05


# -- worker side: one tree per process (a zip handle must not be shared across fork) -------
_TREE: FileTree | None = None
_OPTS: PackOptions | None = None


def _init_worker(location: str, root: str, opts: PackOptions) -> None:
    global _TREE, _OPTS
    _TREE, _OPTS = FileTree(location, root), opts


def _convert(record: Record):
    try:
        data = _TREE.read_bytes(record.path)
    except OSError as e:
        return record, None, f"unreadable file ({e})", {}
    jpeg, reason, changes = to_shard_jpeg(data, _OPTS.image_size, _OPTS.quality, _OPTS.keep_source)
    return record, jpeg, reason, changes


def check_image_size(size: int) -> None:
    if not (size % SIZE_STEP == 0 and MIN_SIZE <= size <= MAX_SIZE):
        raise DataError(f"--image-size must be a multiple of {SIZE_STEP} from {MIN_SIZE} to {MAX_SIZE} "
                        f"(the VAE halves it 4 times), got {size}")


def check_options(opts: PackOptions) -> None:
    check_image_size(opts.image_size)
    for name, value, ok, must in (("--shard-size", opts.shard_size, opts.shard_size > 0, "positive"),
                                  ("--workers", opts.workers, opts.workers >= 0, "0 (all cores) or more"),
                                  ("--quality", opts.quality, 1 <= opts.quality <= 100, "in 1..100")):
        if not ok:
            raise DataError(f"{name} must be {must}, got {value}")


def pack(src_path: str | Path, out_dir: str | Path, opts: PackOptions | None = None) -> dict:
    opts = opts or PackOptions()
    check_options(opts)
    t_list = time.perf_counter()
    src, layout = open_source(src_path, opts.layout)
    try:
        listing = list_source(src, layout, opts.splits, opts.val_fraction, opts.seed)
        list_seconds = time.perf_counter() - t_list
        out_dir = output_dir(out_dir, "pack output folder")  # once the source is known good
        staging = out_dir / f".pack-staging-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            manifest = _pack_listing(src, listing, src_path, staging, opts)
            manifest["list_seconds"] = round(list_seconds, 3)
            _swap_in(staging, out_dir, manifest)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        src.close()
    return manifest


def _pack_listing(src: FileTree, listing, src_path, staging: Path, opts: PackOptions) -> dict:
    """Every split of `listing` into shards in `staging`; returns the manifest."""
    rejected = [{"path": p, "reason": "unsafe path in archive (absolute or '..')"} for p in src.unsafe_members()]
    rejected += listing.rejected
    manifest = {
        "format": "vae-dist-shards/1",
        "image_size": opts.image_size,
        "layout": listing.layout,
        "classes": listing.classes,
        "words": listing.words,
        "source": str(Path(src_path).resolve()),
        "seed": opts.seed,
        "quality": opts.quality,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "splits": {},
        "rejected": rejected,
    }
    splits = {}
    for split, records in listing.splits.items():
        random.Random(f"{opts.seed}-{split}").shuffle(records)  # the global shuffle
        # unique keys by construction: the position in the split, then the readable stem
        # (one name in two classes, or x.y.JPEG beside x_y.JPEG, stay two samples)
        splits[split] = [dataclasses.replace(r, key=f"{i:07d}_{r.key}") for i, r in enumerate(records)]
    total = sum(map(len, splits.values()))
    workers = opts.workers or available_cores()
    t0 = time.perf_counter()
    ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(src_path), src.root, opts)) as pool, \
            Progress(total, f"pack {counted(total, 'image')} on {counted(workers, 'process', 'processes')}") as bar:
        for split, records in splits.items():
            manifest["splits"][split] = _pack_split(pool, records, split, staging, opts, rejected, bar)
    seconds = time.perf_counter() - t0
    if not any(info["count"] for info in manifest["splits"].values()):  # the old shards stay as they are
        first = f" (the first: {rejected[0]['path']}: {rejected[0]['reason']})" if rejected else ""
        raise DataError(f"no images in {src_path}: none of its {counted(len(rejected), 'file')} packs{first}; "
                        f"pack reads Tiny ImageNet, a folder of class folders, or a folder of images")
    manifest.update(pack_seconds=round(seconds, 3), pack_img_per_s=round(total / seconds, 1), pack_workers=workers)
    return manifest


class Progress:
    """Packing's progress: on a terminal a tqdm bar (count, img/s, ETA); elsewhere (a log file,
    a SLURM job) one line every `every` seconds, so a long pack still says where it is."""

    def __init__(self, total: int, desc: str, every: float = 30.0):
        self.total, self.desc, self.every, self.done = total, desc, every, 0
        self.t0 = self.last = time.perf_counter()
        self.bar = tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True) if sys.stderr.isatty() else None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last >= self.every and self.done < self.total:
            self.last = now
            rate = self.done / (now - self.t0)
            eta = tqdm.format_interval((self.total - self.done) / rate)
            print(f"{self.desc}: {self.done}/{self.total} ({self.done / self.total:.0%}), {rate:.0f} img/s, "
                  f"ETA {eta}", file=sys.stderr, flush=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _pack_split(pool, records: list[Record], split: str, staging: Path, opts: PackOptions, rejected: list,
                bar: Progress) -> dict:
    shards, changes = [], Counter()
    writer: ShardWriter | None = None
    for record, jpeg, reason, change in pool.imap(_convert, records, chunksize=64):
        bar.update()
        if jpeg is None:
            rejected.append({"path": record.path, "reason": reason})
            continue
        changes.update(change)
        if writer is None:
            writer = ShardWriter(staging / shard_name(split, len(shards)))
        writer.write(record.key, jpeg, record.label)
        if writer.count == opts.shard_size:
            shards.append(writer.close())
            writer = None
    if writer is not None:
        shards.append(writer.close())
    return {"count": sum(s["count"] for s in shards), "shards": shards, "converted": dict(changes)}


def _swap_in(staging: Path, out_dir: Path, manifest: dict) -> None:
    """Replaces the previous pack in out_dir: the old manifest goes first (so a crash in
    between leaves a folder that `verify` and training reject), the new one goes last."""
    (out_dir / MANIFEST).unlink(missing_ok=True)
    for old in out_dir.iterdir():
        if old.is_file() and old.suffix in (".tar", ".idx") and "-" in old.stem:
            old.unlink()
    for new in staging.iterdir():
        os.replace(new, out_dir / new.name)
    write_json_atomic(out_dir / MANIFEST, manifest)


def summary(manifest: dict) -> str:
    layout = manifest.get("layout", {})
    classes = len(manifest.get("classes", []))
    lines = [f"layout: {layout.get('name', '?')} ({counted(classes, 'class', 'classes') if classes else 'no classes'}; "
             f"val: {layout.get('val', '?')}), images {manifest['image_size']}x{manifest['image_size']}"]
    for split, info in manifest["splits"].items():
        conv = ", ".join(f"{k} {v}" for k, v in sorted(info["converted"].items())) or "none"
        lines.append(f"{split}: {counted(info['count'], 'image')} in {counted(len(info['shards']), 'shard')} (converted: {conv})")
    reasons = Counter(r["reason"].split(" (")[0] for r in manifest["rejected"])  # "unreadable image (...)" as one
    why = ", ".join(f"{reason} {n}" for reason, n in reasons.most_common(4)) + (", ..." if len(reasons) > 4 else "")
    lines.append(f"rejected: {len(manifest['rejected'])}" + (f" ({why}; each listed in manifest.json)" if reasons else ""))
    if manifest.get("pack_img_per_s"):
        lines.append(f"packed at {manifest['pack_img_per_s']:.0f} img/s in {manifest['pack_seconds']:.1f} s "
                     f"on {counted(manifest.get('pack_workers', 1), 'process', 'processes')} "
                     f"(listing took {manifest.get('list_seconds', 0):.1f} s)")
    return "\n".join(lines)

