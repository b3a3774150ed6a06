"""`vae-dist bench data`: each loader over the same shards, in images/second.

DALI mixed (GPU decode), DALI CPU, the PyTorch WebDataset loader, the decoded-split cache
(built once, timed apart, then served from memory) and the seed's ImageFolder + PIL +
DataLoader, side by side in one run. With --shards URL (bench/remote.py): the set fetched whole
once (a row: the link's rate), then each streaming loader from that local copy and streaming
from the URL, side by side; the other rows read the local copy.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import time
from pathlib import Path

import torch

from vae_dist.bench.common import memory, row_or_reason, sync, timed
from vae_dist.bench.remote import link_fields, needed


def bench_data(args, shards: str, images_root: str | None, remote=None) -> list[dict]:
    """`remote`: a bench.remote.RemoteBench where --shards is a URL (`shards` is then its local copy)."""
    from vae_dist.config import DataConfig
    from vae_dist.data import dali
    from vae_dist.data.fetch import FetchOptions
    from vae_dist.data.loaders import CachedLoader, build_loader, decode_split
    from vae_dist.data.shards import ShardSet
    from vae_dist.data.torch_loaders import image_folder_loader

    bs = args.batch_size or (32 if args.tiny else 256)
    threads = args.threads or os.cpu_count() or 1
    steps = args.steps or (4 if args.tiny else 50)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    shard_set = ShardSet.open(shards)
    results = [remote.fetch_row] if remote else []
    cpu = torch.device("cpu")
    gpu = torch.device("cuda", 0) if torch.cuda.is_available() else None

    def stream(make):  # an endless batch stream over epochs
        return itertools.chain.from_iterable(make(e) for e in itertools.count())

    configs = [  # fancy upsampling is the default; the row without it says what matching the CPU's pixels costs
        ("dali-gpu (mixed decode)", "dali", "gpu", gpu),
        ("dali-gpu (mixed decode, plain chroma upsampling)", "dali", "gpu-plain", gpu),
        ("dali-cpu", "dali", "cpu", cpu),
        ("webdataset+torchvision (PyTorch)", "webdataset", "cpu", cpu),
    ]
    # beside a URL: each streaming loader from the local copy, then streaming from the URL, both in
    # data.shuffle=shards order (the URL's, as its set is larger than the cache): the link differs alone
    sources = [("", None)] if remote is None else [(": local copy", None), (": URL, streaming", remote)]
    for (name, loader, decode, device), (where, link) in itertools.product(configs, sources):
        if link is not None and decode.endswith("-plain"):
            continue  # a pixel matter, not a link one: measured from the local copy only
        name += where
        if device is None:
            results.append({"name": name, "unavailable": "no CUDA GPU"})
            continue
        if loader == "dali" and not dali.HAVE_DALI:
            results.append({"name": name, "unavailable": "NVIDIA DALI not installed"})
            continue

        def measure(name=name, loader=loader, decode=decode, device=device, link=link):
            cfg = DataConfig(shards=shards, loader=loader, decode=decode.split("-")[0], num_threads=threads,
                             fancy_upsampling=not decode.endswith("-plain"))
            rows_set = shard_set
            if remote is not None:
                cfg.shuffle = "shards"
            if link is not None:  # a cold cache below the set's size: it streams
                cfg = dataclasses.replace(cfg, **link.stream_settings(threads, cfg.shuffle_block))
                rows_set = ShardSet.open(link.url, FetchOptions.of(cfg))
            ld = build_loader(rows_set, cfg, "train", bs, rank=0, world=1, device=device, train=True, seed=0)
            try:
                row = measure_stream(name, stream(ld.epoch), bs, steps, warmup, args.repeats, device,
                                     link=ld.fetch_stats, threads=threads)
                if remote is not None:
                    row.update(shuffle=cfg.shuffle, **({"shard_cache_gb": cfg.shard_cache_gb} if link else {}))
                    if link is None:
                        row.update(link_fields(None, None))
                return row
            finally:
                ld.close()

        results.append(row_or_reason(name, measure))
    # the decoded-split cache (data.cache): built once (timed apart), then served from memory
    cache_device = gpu or cpu
    cache_name = f"{'gpu' if gpu is not None else 'ram'}-cache (decoded once, then gather + flip)"

    def measure_cache():
        cfg = DataConfig(shards=shards, num_threads=threads)
        t0 = time.perf_counter()
        images, labels = decode_split(shard_set, cfg, "train", cache_device)
        sync(cache_device)
        build_s = time.perf_counter() - t0
        ld = CachedLoader(images, labels, bs)
        return measure_stream(cache_name, stream(ld.epoch), bs, steps, warmup, args.repeats, cache_device,
                              threads=threads, build_s=build_s, build_img_per_s=images.shape[0] / build_s)

    results.append(row_or_reason(cache_name, measure_cache))
    if images_root and Path(images_root, "train").is_dir():
        def measure_seed(name="seed: ImageFolder+PIL DataLoader"):
            dl = image_folder_loader(str(Path(images_root) / "train"), bs, threads)
            return measure_stream(name, stream(lambda e: iter(dl)), bs, steps, warmup, args.repeats, cpu,
                                  threads=threads)

        results.append(row_or_reason("seed: ImageFolder+PIL DataLoader", measure_seed))
    else:
        results.append({"name": "seed: ImageFolder+PIL DataLoader", "unavailable": "pass --images (extracted root)"})
    if remote is not None:  # the MB/s a link must carry to feed each row at its speed
        results = [needed(r, remote.bytes_per_image) for r in results]
    return results


def measure_stream(name, it, bs, steps, warmup, repeats, device, link=None, **extra) -> dict:
    """`link`: the loader's fetch_stats (a loader streaming from a URL gives its prefetcher's
    stats, any other None): the row then carries the link's columns (bench/remote.py)."""
    for _ in range(warmup):
        next(it)
    before = link() if link else None

    def window():
        sync(device)
        t0 = time.perf_counter()
        n = 0
        for _ in range(steps):
            x = next(it)[0]
            n += x.shape[0]
        sync(device)
        return n, time.perf_counter() - t0

    median, rates = timed(window, repeats)
    after = link() if link else None
    row = {"name": name, "img_per_s": median, "batch_size": bs, "steps": steps, "repeats": rates,
           **memory(device), **extra}
    if after is not None:
        row.update(link_fields(before, after))
    return row
