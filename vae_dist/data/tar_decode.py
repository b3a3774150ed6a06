"""A split decoded whole, with nothing but the project's own tar reader: the `.idx` offsets,
a memory-mapped tar, torchvision's libjpeg-turbo decode (the webdataset loader's, so the same
pixels), one shard per task on a process pool over this process's cores.

This is how the RAM and GPU caches fill where no loader package is installed (the GPU machine
before DALI or webdataset travel there) and wherever DALI is not the configured loader: a
cache is read once, so it needs no pipeline, no shuffle and no prefetch, only every core.
Measured on 2 CPU cores (docs/gpu_check.md): ~2x one process, and no DALI pipeline to build.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch

from vae_dist.data import available_cores
from vae_dist.data.shards import ShardIndex, damaged_sample, decode_any, decode_failure, fit_square, preload_resize
from vae_dist.errors import DataError


def decode_shard(tar: str, idx: str, image_size: int, labels: str | None = None, resize: bool = False,
                 fetch=None, t: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (n, 3, S, S), labels int32 (n,)) of one shard, in its order. `labels`: an
    indexed shard's side file; `resize`: its images vary in size (resized and centre-cropped);
    `fetch`: the tars are at a URL, and this is shard `t` of them (fetched into the cache first)."""
    index = ShardIndex([fetch(t) if fetch is not None else tar], [idx], [labels])
    images = np.empty((len(index), 3, image_size, image_size), dtype=np.uint8)
    for i, jpeg in enumerate(index.jpegs(np.arange(len(index)))):
        try:
            x = decode_any(jpeg, index.ext(i))
        except RuntimeError as e:
            raise damaged_sample(*index.where(i), decode_failure(e)) from None
        if resize:
            x = fit_square(x, image_size)
        if tuple(x.shape) != (3, image_size, image_size):
            tar_path, key = index.where(i)
            raise DataError(f"sample {key} in {tar_path} is {x.shape[2]}x{x.shape[1]}, the manifest says "
                            f"{image_size}x{image_size}: pack the data again with `vae-dist pack`")
        images[i] = x.numpy()
    labels = index.labels.copy()
    index.close()
    return images, labels


def pool_workers(shards: int, workers: int | None = None) -> int:
    """Processes for `shards` tasks: the cores this process may use (a SLURM job's), at most one per shard."""
    cores = workers or available_cores()
    return max(1, min(cores, shards))


def decode_split_on_cpus(tars, idxs, count: int, image_size: int, workers: int | None = None,
                         label_paths=None, resize: bool = False, fetch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a split as uint8 (N, 3, S, S) and its labels (int64), both on the host,
    in shard order. One process decodes in place; more fork workers (cheap: torch is loaded,
    and they touch no CUDA), each returning one shard's arrays. `fetch`: the tars stream from a
    URL (each fetched through the shard cache, which evicts the oldest to stay in its bound)."""
    images = torch.empty(count, 3, image_size, image_size, dtype=torch.uint8)
    labels = torch.empty(count, dtype=torch.long)
    n = pool_workers(len(tars), workers)
    label_paths = list(label_paths) if label_paths else [None] * len(tars)  # an indexed set's side files
    if resize:
        preload_resize()
    if n == 1:
        parts = (decode_shard(t, i, image_size, y, resize, fetch, k)
                 for k, (t, i, y) in enumerate(zip(tars, idxs, label_paths)))
        return _gather(parts, images, labels, count)
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(max_workers=n, mp_context=context) as pool:
        parts = pool.map(decode_shard, tars, idxs, [image_size] * len(tars), label_paths,
                         [resize] * len(tars), [fetch] * len(tars), range(len(tars)))
        return _gather(parts, images, labels, count)


def _gather(parts, images: torch.Tensor, labels: torch.Tensor, count: int):
    pos = 0
    for x, y in parts:
        if pos + len(y) <= count:
            images[pos:pos + len(y)] = torch.from_numpy(x)
            labels[pos:pos + len(y)] = torch.from_numpy(y.astype(np.int64))
        pos += len(y)
    if pos != count:
        raise DataError(f"the shards' .idx files list {pos} samples, the manifest {count}: pack the data again "
                        f"with `vae-dist pack`")
    return images, labels
