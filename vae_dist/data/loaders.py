"""Choosing and building the loader a training run uses.

All loaders share one contract: `steps_per_epoch`, and `epoch(e, skip=0)` yielding
(images float NCHW in [0,1] on the training device, labels int64), the same number of
batches on every rank for train, each sample once across ranks for val.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from vae_dist.data import dali
from vae_dist.data.partition import epoch_seed, rank_sample_range, rank_seed, steps_per_epoch
from vae_dist.data.shards import load_manifest, split_files
from vae_dist.data.torch_loaders import WebDatasetLoader
from vae_dist.errors import DataError


def resolve_loader_kind(kind: str) -> str:
    if kind == "auto":
        return "dali" if dali.HAVE_DALI else "webdataset"
    if kind == "dali" and not dali.HAVE_DALI:
        raise DataError("data.loader=dali but NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    return kind


def resolve_decode(decode: str, device: torch.device) -> str:
    if decode == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    if decode == "gpu" and device.type != "cuda":
        raise DataError("data.decode=gpu but training does not run on a CUDA GPU")
    return decode


def build_loader(data_cfg, split: str, batch_size: int, *, rank: int, world: int, device: torch.device,
                 train: bool, seed: int, as_uint8: bool = False):
    """The streaming loader for `split` as configured (DALI or webdataset)."""
    manifest = load_manifest(data_cfg.shards)
    tars, idxs, count = split_files(data_cfg.shards, manifest, split)
    kind = resolve_loader_kind(data_cfg.loader)
    if kind == "dali":
        gpu_id = device.index if device.index is not None else 0
        loader = dali.DaliLoader(
            tars, idxs, count, batch_size, rank=rank, world=world, train=train,
            gpu_id=gpu_id if resolve_decode(data_cfg.decode, device) == "gpu" else None,
            num_threads=data_cfg.num_threads, prefetch=data_cfg.prefetch, seed=seed, flip=data_cfg.flip,
            image_size=manifest["image_size"], buffer=data_cfg.shuffle_buffer, as_uint8=as_uint8,
        )
        return _OnDevice(loader, device)
    return WebDatasetLoader(tars, count, batch_size, rank=rank, world=world, train=train,
                            num_workers=data_cfg.num_threads, seed=seed, flip=data_cfg.flip,
                            buffer=data_cfg.shuffle_buffer, as_uint8=as_uint8, device=device)


class _OnDevice:
    """Moves a loader's batches to the training device (a no-op for GPU-decoded DALI)."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device
        self.steps_per_epoch = loader.steps_per_epoch

    def epoch(self, epoch: int, skip: int = 0):
        for images, labels in self.loader.epoch(epoch, skip):
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


class CachedLoader:
    """The whole split decoded once into (device) memory as uint8; an epoch is a shuffled
    gather plus a flip on the device. Tiny ImageNet's train split is 100k x 12 KiB = 1.2 GB.
    Every rank holds all of it, so each epoch is a fresh global permutation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, rank=0, world=1,
                 train=True, seed=0, flip=True):
        self.images, self.labels = images, labels
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.train, self.seed, self.flip = train, seed, flip and train
        n = images.shape[0]
        self._val_range = rank_sample_range(n, rank, world)
        self.steps_per_epoch = steps_per_epoch(n, batch_size, rank, world, train)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.images.device
        n = self.images.shape[0]
        if self.train:
            g = torch.Generator().manual_seed(epoch_seed(self.seed, epoch))
            perm = torch.randperm(n, generator=g)[self.rank::self.world].to(device)
        else:
            perm = torch.arange(*self._val_range, device=device)
        fg = torch.Generator(device=device).manual_seed(rank_seed(self.seed, epoch, self.rank))
        for step in range(self.steps_per_epoch):
            idx = perm[step * self.batch_size:(step + 1) * self.batch_size]
            if step < skip:
                continue
            x = self.images[idx].float().div_(255)
            if self.flip:
                mask = torch.rand(x.shape[0], 1, 1, 1, device=device, generator=fg) < 0.5
                x = torch.where(mask, x.flip(-1), x)
            yield x, self.labels[idx]


def decode_split(data_cfg, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a split as uint8 (N, 3, S, S) on `device`, in shard order."""
    manifest = load_manifest(data_cfg.shards)
    count = manifest["splits"][split]["count"] if split in manifest.get("splits", {}) else 0
    loader = build_loader(data_cfg, split, min(256, max(1, count)), rank=0, world=1, device=device,
                          train=False, seed=0, as_uint8=True)
    size = manifest["image_size"]
    images = torch.empty(count, 3, size, size, dtype=torch.uint8, device=device)
    labels = torch.empty(count, dtype=torch.long, device=device)
    pos = 0
    for x, y in loader.epoch(0):
        images[pos:pos + x.shape[0]] = x
        labels[pos:pos + x.shape[0]] = y
        pos += x.shape[0]
    assert pos == count, (pos, count)
    return images, labels


def build_train_and_val(data_cfg, batch_size: int, *, rank: int, world: int, device: torch.device, seed: int):
    """(train loader, val loader) as data.cache says: streaming, or cached in RAM / GPU."""
    if data_cfg.cache == "none":
        make = lambda split, train: build_loader(data_cfg, split, batch_size, rank=rank, world=world,  # noqa: E731
                                                 device=device, train=train, seed=seed)
        return make("train", True), make("val", False)
    if data_cfg.cache == "gpu" and device.type != "cuda":
        raise DataError("data.cache=gpu but training does not run on a CUDA GPU (use data.cache=ram)")
    target = device if data_cfg.cache == "gpu" else torch.device("cpu")
    loaders = []
    for split, train in (("train", True), ("val", False)):
        images, labels = decode_split(data_cfg, split, target)
        loaders.append(_OnDevice(CachedLoader(images, labels, batch_size, rank=rank, world=world, train=train,
                                              seed=seed, flip=data_cfg.flip), device))
    return tuple(loaders)
