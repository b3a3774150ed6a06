"""Shards at a URL as a run reads them: where their bytes come from, and when.

A shard set at `https://...` or `s3://...` (or a local index whose `shard_base` is one) is
read through a node-local `ShardCache` (data.shard_cache, bounded by data.shard_cache_gb):
- the manifest, `.idx` and label files are small: read at start, kept in the cache folder;
- where every shard of the set fits the cache, all are fetched once, on background threads,
  before the loaders start (the global order touches every shard in its first batches
  anyway): the loaders then read local files exactly as for a local folder, every epoch, at
  local speed, and a later run on the node finds them there;
- where they do not fit, the run streams: the train order is data.shuffle=shards (each rank
  its blocks of shards), and each loader fetches a shard as its plan reaches it, a
  `Prefetcher` keeping data.shard_prefetch shards ahead and evicting those behind.
Every tar is checked against the manifest's sha256 on arrival (a wrong or cut transfer is
fetched again, then one line).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from vae_dist.config import DataConfig
from vae_dist.data.remote import Remote, folder_url, is_url, open_remote
from vae_dist.data.shard_cache import Prefetcher, ShardCache, default_folder
from vae_dist.errors import counted


@dataclass(frozen=True)
class FetchOptions:
    """data.shard_cache, shard_cache_gb, shard_prefetch, fetch_retries (the defaults: DataConfig's)."""

    cache: str | None = DataConfig.shard_cache
    cache_gb: float = DataConfig.shard_cache_gb
    prefetch: int = DataConfig.shard_prefetch
    retries: int = DataConfig.fetch_retries
    backoff: float = 0.5  # the first wait between tries (doubled each time); tests shorten it

    @classmethod
    def of(cls, data_cfg) -> FetchOptions:
        return cls(cache=data_cfg.shard_cache, cache_gb=data_cfg.shard_cache_gb, prefetch=data_cfg.shard_prefetch,
                   retries=data_cfg.fetch_retries)

    @property
    def cache_bytes(self) -> int:
        return int(self.cache_gb * 1e9)

    def remote(self, url: str) -> Remote:
        return open_remote(url, retries=self.retries, backoff=self.backoff)

    def cache_for(self, remote: Remote) -> ShardCache:
        return ShardCache(remote, self.cache or default_folder(remote.url), self.cache_bytes)


def base_url(manifest: dict) -> str | None:
    """The URL of an indexed set's tars where its shard_base is one (http(s):// or s3://), else None."""
    base = manifest.get("shard_base")
    return folder_url(base) if is_url(base) else None


def tar_url(root: str, manifest: dict) -> str | None:
    """The URL of a set's tars, or None where they are local: `shard_base` where it is a URL,
    else the set's own URL (with a relative `shard_base` under it)."""
    url = base_url(manifest)
    if url is not None:
        return url
    base = manifest.get("shard_base")
    if is_url(root):
        return root.rstrip("/") + "/" + (base.strip("/") + "/" if base and base.strip("/.") else "")
    return None


class TarFetch:
    """A split's tars at a URL: shard t -> its local path in the cache, fetched and verified
    first where it is not there. Picklable (DataLoader workers and pool processes fetch
    through their own copy; the cache's locks make a shard arrive once per node)."""

    def __init__(self, cache: ShardCache, shards: list[dict]):
        self.cache = cache
        self.items = [(s["file"], s["bytes"], s["sha256"]) for s in shards]

    def __len__(self) -> int:
        return len(self.items)

    def __call__(self, t: int) -> str:
        return self.cache.path(*self.items[t])

    def local_path(self, t: int) -> str:
        name, _, sha256 = self.items[t]
        return str(self.cache.local_path(name, sha256))

    def prefetcher(self, depth: int) -> Prefetcher:
        return Prefetcher(self.cache, depth)

    def plan(self, prefetcher: Prefetcher, shards) -> None:
        """Tells `prefetcher` the shards (ids) coming next, in order of use."""
        prefetcher.plan([self.items[t] for t in shards])

    def get(self, prefetcher: Prefetcher, t: int) -> str:
        return prefetcher.get(self.items[t][0])


WHOLE_SET_AHEAD = 8  # shards in flight at least when a set is fetched whole (fetch_all)


def fetch_all(fetches: list[TarFetch], depth: int, say=None) -> dict:
    """Every tar of `fetches` into the cache (those there already cost a touch), on background
    threads; returns the link's stats. `say`: where the progress line goes (stderr)."""
    items = [(f, t) for f in fetches for t in range(len(f))]
    if not items:
        return {"bytes": 0, "fetch_seconds": 0.0, "link_mb_s": 0.0, "fetches": 0}
    start = time.monotonic()
    with items[0][0].prefetcher(max(depth, WHOLE_SET_AHEAD)) as prefetcher:
        prefetcher.plan([f.items[t] for f, t in items])
        for f, t in items:
            prefetcher.get(f.items[t][0])
        stats = prefetcher.stats()
    stats["seconds"] = time.monotonic() - start
    if stats["fetches"] and say is not None:
        say(f"fetched {counted(stats['fetches'], 'shard')} ({stats['bytes'] / 1e6:.1f} MB) into "
            f"{fetches[0].cache.folder} in {stats['seconds']:.1f} s ({stats['link_mb_s']:.1f} MB/s)")
    return stats


def stderr_line(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class StreamFeed:
    """A streaming loader's shards at a URL: fetched ahead of its batches on a Prefetcher's
    threads, and let go once the stream is past them. Per epoch `start(ids, batch_size, skip)`
    with the rank's sample ids in order; then, before batch b is read, `path(t)` for each tar it
    needs that is not open yet (fetched; waits only where the link is behind), and
    `done_before(b)`: the tars no batch from b on reads, to unmap, so the cache may evict them."""

    def __init__(self, fetch: TarFetch, depth: int, shard_of):
        self.fetch, self.shard_of = fetch, shard_of
        self.prefetcher = fetch.prefetcher(depth)
        self._last_use: dict[int, int] = {}
        self._released: set[int] = set()
        self._seen: set[int] = set()

    def start(self, ids, batch_size: int, skip: int = 0) -> None:
        shards = self.shard_of[ids[skip * batch_size:]]
        order = list(dict.fromkeys(shards.tolist()))  # first use
        self.fetch.plan(self.prefetcher, order)
        shards_seen, from_end = np.unique(shards[::-1], return_index=True)
        last_batch = skip + (len(shards) - 1 - from_end) // batch_size  # the batch that reads each one last
        self._last_use, self._released = dict(zip(shards_seen.tolist(), last_batch.tolist())), set()
        self._seen = set()

    def path(self, t: int) -> str:
        """The local path of tar t, waiting only where the link is behind. The caller opens (maps)
        it at once: from the next `path` on, the prefetcher may let it go, and another process
        on the node evict it (an open file stays readable)."""
        return self.fetch.get(self.prefetcher, t)

    def advance(self, ids) -> None:
        """Moves the prefetch window to the batch `ids` (a loader whose workers open the tars)."""
        for t in dict.fromkeys(self.shard_of[ids].tolist()):
            if t not in self._seen:
                self._seen.add(t)
                self.path(t)

    def done_before(self, batch: int) -> list[int]:
        done = [t for t, last in self._last_use.items() if last < batch and t not in self._released]
        self._released.update(done)
        return done

    def stats(self) -> dict:
        return self.prefetcher.stats()

    def close(self) -> None:
        self.prefetcher.close()
