"""`bench data|e2e --shards URL`: the same shards read from the URL and from local disk, side by side.

The set is first fetched once, whole, into a local temporary shard folder: that is a row of its
own (the link's rate with the whole set in flight, `fetch whole set`). Then each streaming row is
measured twice: from that local copy, and streaming from the URL through a fresh, cold shard cache
whose budget is below the set's size (so the loader really streams: data.shuffle=shards, each
shard fetched as the plan reaches it, `--prefetch` shards ahead). Both rows of a pair read in the
same order (data.shuffle=shards), so what differs is the link alone.

Every row gives the link's MB/s (measured by its own prefetcher: the bytes over the wall time with
a fetch running), the prefetch depth, the seconds the loader waited on the link in the timed
windows, its img/s, and `needed_mb_s`: the set's bytes per image x that img/s, what a link must
carry to feed the loader at that speed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from vae_dist.data.fetch import WHOLE_SET_AHEAD, FetchOptions
from vae_dist.data.shards import MANIFEST, ShardSet


@dataclass
class RemoteBench:
    """A set at `url`, its local copy at `local`, and what a streaming row needs to know."""

    url: str
    local: str  # the local copy's shard folder
    folder: Path  # the temporary folder holding it (and each row's cold cache), removed by close()
    depth: int  # shards fetched ahead (--prefetch)
    set_bytes: int  # every tar of every split
    bytes_per_image: float  # the train split's tar bytes / its images
    largest_shard: int
    fetch_row: dict  # "fetch whole set: N MB in S s = X MB/s"
    _rows: int = 0

    def stream_settings(self, threads: int, block: int) -> dict:
        """The data.* settings of a row streaming from the URL: a new, empty (cold) shard cache
        folder, `depth` shards fetched ahead, and a budget below the set's size (so it streams),
        big enough for what one loader holds at once: a block of shards shuffled together, the
        shards fetched ahead, one per worker."""
        need = (block + self.depth + threads + 2) * self.largest_shard
        self._rows += 1
        cache = self.folder / f"cache-{self._rows}"
        cache.mkdir()
        return {"shards": self.url, "shard_cache": str(cache), "shard_cache_gb": min(need, self.set_bytes - 1) / 1e9,
                "shard_prefetch": self.depth}

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def open_remote_bench(url: str, depth: int, say=print) -> RemoteBench:
    """Fetches the set at `url` once, whole, into a local temporary shard folder; the fetch is timed
    (the link's rate). The caller closes it (removes the folder)."""
    folder = Path(tempfile.mkdtemp(prefix="vae-dist-bench-remote-"))
    try:
        return _local_copy(url, folder, depth, say)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _local_copy(url: str, folder: Path, depth: int, say) -> RemoteBench:
    cache = folder / "whole"
    remote = ShardSet.open(url, FetchOptions(cache=str(cache), cache_gb=1e6, prefetch=depth))
    splits = [s for s in remote.manifest.get("splits", {}) if remote.count(s)]
    files = {s: remote.files(s) for s in splits}  # the .idx and label files, fetched (small)
    say(f"bench: fetching the set at {url} whole into {folder} (a local copy to measure beside the URL)", flush=True)
    stats = remote.fetch_everything(splits) or {"bytes": 0, "seconds": 0.0, "link_mb_s": 0.0}
    local = folder / "shards"
    manifest = {k: v for k, v in remote.manifest.items() if k != "shard_base"}  # the tars beside it
    for split in splits:
        f, shards = files[split], remote.manifest["splits"][split]["shards"]
        for t, shard in enumerate(shards):
            _place(f.tars[t], local / shard["file"])
            _place(f.idxs[t], local / shard["index"])
            if f.labels and f.labels[t]:
                _place(f.labels[t], local / shard["labels"])
    (local / MANIFEST).write_text(json.dumps(manifest, indent=1))
    shutil.rmtree(cache, ignore_errors=True)  # the local copy holds links to its files
    train = remote.manifest["splits"].get("train", {}).get("shards", [])
    train_count = sum(s["count"] for s in train)
    every = [s for info in remote.manifest["splits"].values() for s in info.get("shards", [])]
    images = sum(remote.count(s) for s in splits)
    mb, seconds = stats["bytes"] / 1e6, stats["seconds"]
    row = {"name": "fetch whole set (URL -> local folder)", "img_per_s": images / seconds if seconds else 0.0,
           "images": images, "fetched_mb": mb, "seconds": seconds, "link_mb_s": stats["link_mb_s"],
           "prefetch_depth": max(depth, WHOLE_SET_AHEAD), "link_wait_s": None, "needed_mb_s": None,
           "note": f"fetch whole set: {mb:.1f} MB in {seconds:.2f} s = {mb / seconds if seconds else 0:.1f} MB/s, "
                   f"{max(depth, WHOLE_SET_AHEAD)} shards ahead (img/s: images fetched a second)"}
    return RemoteBench(url=url, local=str(local), folder=folder, depth=depth, set_bytes=remote.shard_bytes(),
                       bytes_per_image=sum(s["bytes"] for s in train) / max(1, train_count),
                       largest_shard=max(s["bytes"] for s in every), fetch_row=row)


def _place(src: str, dest: Path) -> None:
    """`src` at `dest`: a hard link where the file system allows one (no second copy), else a copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def link_fields(before: dict | None, after: dict | None) -> dict:
    """A row's link columns from its prefetcher's stats at the start and the end of the timed
    windows (None, None: a row from local disk, no link)."""
    if after is None:
        return {"link_mb_s": None, "prefetch_depth": None, "link_wait_s": None}
    before = before or {"wait_seconds": 0.0, "waits": 0, "bytes": 0}
    return {"link_mb_s": after["link_mb_s"], "prefetch_depth": after["depth"],
            "link_wait_s": after["wait_seconds"] - before["wait_seconds"], "link_waits": after["waits"] - before["waits"],
            "fetched_mb": after["bytes"] / 1e6, "link_retries": after.get("retries", 0)}


def needed(row: dict, bytes_per_image: float | None) -> dict:
    """`row` with needed_mb_s: the MB/s a link must carry to feed it at its img/s."""
    if bytes_per_image and "img_per_s" in row and "needed_mb_s" not in row:
        row["needed_mb_s"] = bytes_per_image * row["img_per_s"] / 1e6
    return row
