"""`vae-dist pack`: Tiny ImageNet (folder or zip) -> shuffled WebDataset shards + manifest.

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
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vae_dist.data.images import to_shard_jpeg
from vae_dist.data.shards import MANIFEST, ShardWriter, shard_name, write_json_atomic
from vae_dist.data.tinyimagenet import Record, Source, list_split, read_classes
from vae_dist.errors import DataError, counted
from vae_dist.files import output_dir


@dataclass
class PackOptions:
    shard_size: int = 5000
    workers: int = 0  # 0: all cores
    seed: int = 0
    splits: tuple[str, ...] = ("train", "val")
    image_size: int = 64
    quality: int = 95
    keep_source: bool = True  # keep bytes that already are RGB SxS baseline JPEGs


# -- worker side: one Source per process (a zip handle must not be shared across fork) ---
_SOURCE: Source | None = None
_OPTS: PackOptions | None = None


def _init_worker(location: str, opts: PackOptions) -> None:
    global _SOURCE, _OPTS
    _SOURCE, _OPTS = Source(location), opts


def _convert(record: Record):
    try:
        data = _SOURCE.read_bytes(record.path)
    except OSError as e:
        return record, None, f"unreadable file ({e})", {}
    jpeg, reason, changes = to_shard_jpeg(data, _OPTS.image_size, _OPTS.quality, _OPTS.keep_source)
    return record, jpeg, reason, changes


def pack(src_path: str | Path, out_dir: str | Path, opts: PackOptions | None = None) -> dict:
    opts = opts or PackOptions()
    for name, value, ok, must in (("--shard-size", opts.shard_size, opts.shard_size > 0, "positive"),
                                  ("--workers", opts.workers, opts.workers >= 0, "0 (all cores) or more"),
                                  ("--image-size", opts.image_size, opts.image_size > 0, "positive"),
                                  ("--quality", opts.quality, 1 <= opts.quality <= 100, "in 1..100")):
        if not ok:
            raise DataError(f"{name} must be {must}, got {value}")
    src = Source(src_path)
    wnids, words = read_classes(src)
    out_dir = output_dir(out_dir, "pack output folder")
    staging = out_dir / f".pack-staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()

    rejected = [{"path": p, "reason": "unsafe path in archive (absolute or '..')"} for p in src.unsafe_members()]
    manifest = {
        "format": "vae-dist-shards/1",
        "image_size": opts.image_size,
        "classes": wnids,
        "words": words,
        "source": str(Path(src_path).resolve()),
        "seed": opts.seed,
        "quality": opts.quality,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "splits": {},
        "rejected": rejected,
    }
    workers = opts.workers or os.cpu_count() or 1
    t0 = time.perf_counter()
    total = 0
    try:
        ctx = mp.get_context("fork" if hasattr(os, "fork") else "spawn")
        with ctx.Pool(workers, initializer=_init_worker, initargs=(str(src_path), opts)) as pool:
            for split in opts.splits:
                records, unlabelled = list_split(src, split, wnids)
                rejected += unlabelled
                random.Random(f"{opts.seed}-{split}").shuffle(records)  # the global shuffle
                # unique keys by construction: the position in the split, then the readable stem
                # (one name in two classes, or x.y.JPEG beside x_y.JPEG, stay two samples)
                records = [dataclasses.replace(r, key=f"{i:07d}_{r.key}") for i, r in enumerate(records)]
                manifest["splits"][split] = _pack_split(pool, records, split, staging, opts, rejected)
                total += len(records)
        seconds = time.perf_counter() - t0
        manifest["pack_seconds"] = round(seconds, 3)
        manifest["pack_img_per_s"] = round(total / seconds, 1)
        _swap_in(staging, out_dir, manifest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        src.close()
    return manifest


def _pack_split(pool, records: list[Record], split: str, staging: Path, opts: PackOptions, rejected: list) -> dict:
    shards, changes = [], Counter()
    writer: ShardWriter | None = None
    results = pool.imap(_convert, records, chunksize=64)
    for record, jpeg, reason, change in tqdm(results, total=len(records), desc=f"pack {split}", unit="img", disable=None):
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
    lines = []
    for split, info in manifest["splits"].items():
        conv = ", ".join(f"{k} {v}" for k, v in sorted(info["converted"].items())) or "none"
        lines.append(f"{split}: {counted(info['count'], 'image')} in {counted(len(info['shards']), 'shard')} (converted: {conv})")
    lines.append(f"rejected: {len(manifest['rejected'])}" + (" (listed in manifest.json)" if manifest["rejected"] else ""))
    if manifest.get("pack_img_per_s"):
        lines.append(f"packed at {manifest['pack_img_per_s']:.0f} img/s in {manifest['pack_seconds']:.1f} s")
    return "\n".join(lines)

