"""Plain-PyTorch loaders: the fallback where DALI is missing, and the benchmark baselines.

- `WebDatasetLoader`: the same shards through the `webdataset` library, decoded by
  torchvision.io in DataLoader workers, with the same per-rank split and step count as
  the DALI loader.
- `image_folder_loader`: the seed's way, torchvision ImageFolder + PIL + DataLoader over
  the extracted JPEG folder (benchmark baseline only).
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_jpeg

from vae_dist.data.partition import epoch_seed, rank_sample_range, steps_per_epoch
from vae_dist.data.shards import decode_label
from vae_dist.errors import DataError


class _ShardBatches(IterableDataset):
    """Batches of decoded (uint8 NCHW, labels) from one rank's part of a split, one epoch.

    Batch b of the rank goes to DataLoader worker b % num_workers, and the DataLoader takes
    batches from its workers round-robin, so the rank gets exactly its batches: all of them
    full for train (`steps` of them), every sample once for val."""

    def __init__(self, paths, count, batch_size, steps, rank, world, epoch, train, seed, flip, buffer):
        self.paths, self.count, self.batch_size, self.steps = paths, count, batch_size, steps
        self.rank, self.world, self.epoch, self.train = rank, world, epoch, train
        self.seed, self.flip, self.buffer = seed, flip, buffer

    def __iter__(self):
        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        bs = self.batch_size
        order = list(self.paths)
        if self.train:
            random.Random(epoch_seed(self.seed, self.epoch)).shuffle(order)
        lo, hi = rank_sample_range(self.count, self.rank, self.world)
        limit = self.steps * bs if self.train else hi - lo
        rng = random.Random(f"{self.seed}-{self.epoch}-{self.rank}-{wid}")
        import webdataset as wds  # optional: WebDatasetLoader checks for it when it is built

        # every process reads the tar stream (cheap) and decodes only its own samples
        ds = wds.WebDataset(order, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False)
        buf: list = []
        for i, sample in enumerate(ds):
            j = i - lo
            if j >= limit:
                break
            if j < 0 or (j // bs) % nworkers != wid:
                continue
            if "jpg" not in sample or "label" not in sample:
                raise DataError(f"sample {sample.get('__key__')} in {sample.get('__url__')} lacks jpg or label")
            img = decode_jpeg(torch.frombuffer(bytearray(sample["jpg"]), dtype=torch.uint8), mode=ImageReadMode.RGB)
            if self.flip and rng.random() < 0.5:
                img = img.flip(-1)
            buf.append((img, decode_label(sample["label"])))
            if len(buf) >= (self.buffer + bs if self.train else bs):
                yield _collate([buf.pop(rng.randrange(len(buf))) for _ in range(bs)] if self.train else buf[:bs])
                buf = buf if self.train else buf[bs:]
        if self.train:
            rng.shuffle(buf)
        for k in range(0, len(buf), bs):
            yield _collate(buf[k:k + bs])


def _collate(items):
    return torch.stack([img for img, _ in items]), torch.tensor([label for _, label in items])


def have_webdataset() -> bool:
    return importlib.util.find_spec("webdataset") is not None


class WebDatasetLoader:
    """Same contract as DaliLoader: epoch(e, skip) yields (uint8 NCHW, int64 labels)."""

    def __init__(self, paths, count, batch_size, *, rank=0, world=1, train=True, num_workers=4,
                 seed=0, flip=True, buffer=4096, device="cpu"):
        if not have_webdataset():
            raise DataError("data.loader=webdataset but the webdataset package is not installed (pip install webdataset)")
        self.paths, self.count, self.batch_size = list(paths), count, batch_size
        self.rank, self.world, self.train = rank, world, train
        self.num_workers, self.seed, self.flip = num_workers, seed, flip and train
        self.buffer, self.device = buffer, torch.device(device)
        self.steps_per_epoch = steps_per_epoch(count, batch_size, rank, world, train)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds = _ShardBatches(self.paths, self.count, self.batch_size, self.steps_per_epoch, self.rank, self.world,
                           epoch, self.train, self.seed, self.flip, self.buffer)
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda")
        for i, (images, labels) in enumerate(loader):
            if i < skip:
                continue
            images = images.to(self.device, non_blocking=True)
            yield images, labels.long().to(self.device, non_blocking=True)

    def close(self) -> None:
        pass  # each epoch's DataLoader workers end with its iterator


def image_folder_loader(train_dir: str, batch_size: int, num_workers: int) -> DataLoader:
    """The seed's loader: ImageFolder over train/<wnid>/images/*.JPEG, PIL decode, ToTensor."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    ds = datasets.ImageFolder(train_dir, transform=tf)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
                      persistent_workers=num_workers > 0)
