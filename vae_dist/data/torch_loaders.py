"""Plain-PyTorch loaders: the fallback where DALI is missing, and the benchmark baselines.

- `WebDatasetLoader`: the same shards through the `webdataset` library, decoded by
  torchvision.io in DataLoader workers, with the same samples per rank and epoch, and the
  same step count, as the DALI loader.
- `image_folder_loader`: the seed's way, torchvision ImageFolder + PIL + DataLoader over
  the extracted JPEG folder (benchmark baseline only).
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vae_dist.data.partition import (
    epoch_order,
    epoch_seed,
    rank_seed,
    shard_of,
    shards_in_use,
    starts,
    steps_per_epoch,
)
from vae_dist.data.shards import (
    damaged_sample,
    decode_any,
    decode_failure,
    decode_label,
    fit_square,
    index_keys,
    preload_resize,
    read_labels,
)
from vae_dist.errors import DataError


def epoch_plan(counts: list[int], batch_size: int, steps: int, epoch: int, rank: int, world: int, train: bool,
               seed: int, flip: bool, window: int, shuffle: str = "global",
               block: int = 1) -> tuple[list[np.ndarray], list[np.ndarray], list[int]]:
    """(sample ids per batch, flips per batch, the epoch's shard order) of one rank, decided
    before a byte is read, from (seed, epoch, rank) alone, so a resumed epoch is the same epoch.

    train: the rank's slice of the epoch's global permutation, as in the DALI loader and the
    cache (every sample every epoch but the remainder cut to whole batches, which moves between
    epochs; a new mix of ranks each epoch), cut to `steps` batches. A stream reads the shards
    in order, so these samples are taken in the epoch's shard order and shuffled within
    windows of `window` samples (the shuffle buffer, made exact). shuffle='shards': the rank's
    samples in the DALI loader's very order (blocks of `block` shards, shuffled within), and the
    rank reads only the shards they lie in, in order of first use (no shuffle buffer: the block
    is one). val: the rank's contiguous part in shard order, the last batch partial."""
    count = sum(counts)
    shards = list(range(len(counts)))
    ids, flips = epoch_order(epoch, count, rank, world, train, seed, flip, shuffle=shuffle, counts=counts, block=block)
    if train and shuffle == "shards":
        ids, flips = ids[:steps * batch_size], flips[:steps * batch_size]
        shards = shards_in_use(ids, counts)
    elif train:
        random.Random(epoch_seed(seed, epoch)).shuffle(shards)
        ids, flips = ids[:steps * batch_size], flips[:steps * batch_size]
        first = starts(counts)  # each shard's first sample id
        shard = shard_of(counts)[ids]
        read_at = np.empty(len(counts), dtype=np.int64)  # where each shard starts in this epoch's stream
        read_at[shards] = starts(np.asarray(counts)[shards])
        order = np.argsort(read_at[shard] + ids - first[shard], kind="stable")
        rng = np.random.default_rng(rank_seed(seed, epoch, rank))
        for lo in range(0, len(order), window):
            rng.shuffle(order[lo:lo + window])
        ids, flips = ids[order], flips[order]
    cuts = range(0, len(ids), batch_size)
    return [ids[c:c + batch_size] for c in cuts], [flips[c:c + batch_size] for c in cuts], shards


class _ShardBatches(IterableDataset):
    """One rank's batches of an epoch (from batch `skip` on), streamed from the tars.

    Batch b goes to DataLoader worker (b - skip) % num_workers, and the DataLoader takes
    batches from its workers round-robin, so the rank gets its batches in order. Each worker
    reads the stream (cheap), keeps the JPEG bytes of its own pending batches only, decodes a
    batch once its last sample has been read and stops reading when it has them all."""

    def __init__(self, paths, counts, batches, flips, shard_order, skip, samples=None, image_size=None, fetch=None):
        self.paths, self.counts, self.batches, self.flips = paths, counts, batches, flips
        self.shard_order, self.skip = shard_order, skip
        # tars at a URL (fetch.TarFetch): each is fetched into the shard cache as the worker
        # reaches it (where the loader's prefetcher has not already), `paths` being where it lands
        self.fetch = fetch
        # per shard, its .idx's samples by key: {key: (position, image ext, label)}, the label None
        # where a `.label` member holds it; None: by position in the tar (no .idx files given);
        # image_size: resize to it at decode
        self.samples, self.image_size = samples, image_size

    def __iter__(self):
        """The worker's batches; a DataError crosses to the main process as a `Refused` item,
        which it raises: raised here, it would arrive wrapped in the worker's traceback
        ("Caught DataError in DataLoader worker process 0. Original Traceback ...")."""
        try:
            yield from self._batches()
        except DataError as e:
            yield Refused(str(e))

    def _batches(self):
        import webdataset as wds  # optional: WebDatasetLoader checks for it when it is built

        info = get_worker_info()
        wid, nworkers = (info.id, info.num_workers) if info else (0, 1)
        mine = [b for b in range(self.skip, len(self.batches)) if (b - self.skip) % nworkers == wid]
        if not mine:
            return
        slot_of = {int(i): (b, k) for b in mine for k, i in enumerate(self.batches[b])}  # sample id -> batch, place
        pending = {b: [None] * len(self.batches[b]) for b in mine}
        missing = {b: len(self.batches[b]) for b in mine}
        first = starts(self.counts).tolist()
        # only the shards this worker's batches lie in (a resumed epoch, a rank's blocks of shards)
        needed = set(shard_of(self.counts)[np.concatenate([self.batches[b] for b in mine])].tolist())
        shard_at = {self.paths[s]: s for s in self.shard_order if s in needed}

        def stream():  # shard by shard, so a tar at a URL is fetched only when the worker reaches it
            for path, s in shard_at.items():
                if self.fetch is not None:
                    self.fetch(s)
                yield from wds.WebDataset([path], shardshuffle=False, nodesplitter=None, workersplitter=None,
                                          empty_check=False)

        ds = stream()
        url, position, ready, turn = None, 0, {}, 0
        for sample in ds:
            if sample["__url__"] != url:
                url, position = sample["__url__"], 0
            if self.samples is None:
                # every sample read, used or not: a member that is no file (a link) is skipped by
                # webdataset, and the sample it belonged to comes without it
                _check_complete(sample)
                sample_id, ext, label = first[shard_at[url]] + position, "jpg", None
                position += 1
            else:  # by key: an .idx may list a subset of its tar (a val fraction), or skip samples
                found = self.samples[shard_at[url]].get(sample["__key__"])
                if found is None or found[0] >= self.counts[shard_at[url]]:
                    continue
                sample_id, ext, label = first[shard_at[url]] + found[0], found[1], found[2]
                _check_complete(sample, ext, label is None)  # (the .idx lists a label member)
            if sample_id not in slot_of:
                continue
            b, k = slot_of.pop(sample_id)
            label = decode_label(sample["label"]) if label is None else label
            pending[b][k] = (sample[ext], label, sample["__key__"], url, ext)
            missing[b] -= 1
            if missing[b] == 0:
                ready[b] = _decode(pending.pop(b), self.flips[b], self.image_size)
            while turn < len(mine) and mine[turn] in ready:
                yield ready.pop(mine[turn])
                turn += 1
            if turn == len(mine):
                return
        if turn < len(mine):
            raise DataError(f"the shards hold fewer samples than manifest.json lists ({len(slot_of)} not found)")


def _check_complete(sample: dict, image: str = "jpg", label: bool = True) -> None:
    lacks = [ext for ext in (image, "label") if ext not in sample and (ext != "label" or label)]
    if lacks:
        tar = sample["__url__"]
        raise DataError(f"sample {sample.get('__key__')} in {tar} lacks {' and '.join(lacks)} (a link or other member "
                        f"that is not a file, or none): the shard is damaged; `vae-dist verify {Path(tar).parent}` "
                        f"checks every shard, and packing again replaces it")


class Refused:
    """A DataError raised in a worker, as the main process receives it in place of a batch (the
    error itself would cross the process line inside a worker traceback). Not a tuple, so the
    DataLoader's convert and pin-memory steps pass it through as it is."""

    def __init__(self, message: str):
        self.message = message


def _decode(items, flips, resize_to=None):
    """A batch's images decoded (and resized to `resize_to`, an indexed set's image size), flipped."""
    images = []
    for (data, _, key, url, ext), flip in zip(items, flips):
        try:
            img = decode_any(data, ext)
        except RuntimeError as e:  # its reason is in the error: no second decode
            raise damaged_sample(url, key, decode_failure(e)) from None
        if resize_to is not None:
            img = fit_square(img, resize_to)
        images.append(img.flip(-1) if flip else img)
    return torch.stack(images), torch.tensor([item[1] for item in items])


def have_webdataset() -> bool:
    return importlib.util.find_spec("webdataset") is not None


class WebDatasetLoader:
    """Same contract as DaliLoader: epoch(e, skip) yields (uint8 NCHW, int64 labels), the
    same samples, partition and step count (train differs only in the order within an epoch).
    `counts`: samples per tar; `limit`: only the first `limit` samples (val's train.eval_images)."""

    def __init__(self, paths, counts, batch_size, *, rank=0, world=1, train=True, num_workers=4,
                 seed=0, flip=True, buffer=4096, device="cpu", limit=None, shuffle="global", shuffle_block=1,
                 idxs=None, label_paths=None, image_size=None, resize=False, fetch=None, fetch_ahead=4):
        if not have_webdataset():
            raise DataError("data.loader=webdataset but the webdataset package is not installed (pip install webdataset)")
        counts = _cut(list(counts), limit)
        used = sum(c > 0 for c in counts)  # the shards that hold any of the samples (a prefix)
        self.paths, self.counts, self.batch_size = list(paths)[:used], counts[:used], batch_size
        self.rank, self.world, self.train = rank, world, train
        self.num_workers, self.seed, self.flip = num_workers, seed, flip and train
        self.buffer, self.device = buffer, torch.device(device)
        self.shuffle, self.shuffle_block = shuffle, shuffle_block  # the train order: partition.epoch_order
        self.steps_per_epoch = steps_per_epoch(sum(self.counts), batch_size, rank, world, train)
        # each streamed sample's id found by its key in the .idx files (they may list a subset of a tar)
        self.samples = _samples_by_key(idxs[:used], list(label_paths or [None] * used)[:used]) if idxs else None
        self.resize_to = image_size if resize else None
        self.fetch, self.fetch_ahead, self._feed = fetch, fetch_ahead, None
        if resize:
            preload_resize()

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches, flips, shards = epoch_plan(self.counts, self.batch_size, self.steps_per_epoch, epoch, self.rank,
                                            self.world, self.train, self.seed, self.flip, self.buffer,
                                            self.shuffle, self.shuffle_block)
        ds = _ShardBatches(self.paths, self.counts, batches, flips, shards, skip, self.samples, self.resize_to,
                           self.fetch)
        feed = self._stream_feed(batches, skip)
        # a generator of its own: starting the workers draws their base seed from it, not from
        # the global torch RNG (the reparameterization noise that checkpoints save and restore)
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers,
                            pin_memory=self.device.type == "cuda", generator=torch.Generator().manual_seed(epoch))
        for b, batch in enumerate(loader, start=skip):
            if isinstance(batch, Refused):
                raise DataError(batch.message)
            if feed is not None:  # the workers fetch what they reach; this moves the prefetch window on
                feed.advance(batches[b])
            images, labels = batch
            yield images.to(self.device, non_blocking=True), labels.long().to(self.device, non_blocking=True)

    def _stream_feed(self, batches, skip: int):
        """Tars at a URL: a prefetcher over the epoch's plan (from batch `skip`), made once."""
        if self.fetch is None or not batches:
            return None
        if self._feed is None:
            from vae_dist.data.fetch import StreamFeed

            self._feed = StreamFeed(self.fetch, self.fetch_ahead, shard_of(self.counts))
        self._feed.start(np.concatenate(batches), self.batch_size, skip)
        return self._feed

    def fetch_stats(self) -> dict | None:
        return self._feed.stats() if self._feed is not None else None

    def close(self) -> None:
        if self._feed is not None:  # each epoch's DataLoader workers end with its iterator
            self._feed.close()
            self._feed = None


def _samples_by_key(idxs, label_paths) -> list[dict]:
    """Per shard {key: (its line in the .idx, image ext, label)}: the webdataset loader's map from a
    streamed sample to its id. The label: the side file's, else None where the line lists a
    `.label` member (read from the sample), else -1."""
    out = []
    for idx, labels in zip(idxs, label_paths):
        keys = index_keys(idx)
        values = read_labels(labels, len(keys)).tolist() if labels is not None else [-1] * len(keys)
        out.append({key: (n, ext, None if labels is None and member else values[n])
                    for n, (key, ext, member) in enumerate(keys)})
    return out


def _cut(counts: list[int], limit: int | None) -> list[int]:
    """Per-shard counts of the first `limit` samples (all where limit is None)."""
    if limit is None:
        return counts
    out, left = [], limit
    for c in counts:
        out.append(min(c, left))
        left -= out[-1]
    return out


def image_folder_loader(train_dir: str, batch_size: int, num_workers: int) -> DataLoader:
    """The seed's loader: ImageFolder over train/<wnid>/images/*.JPEG, PIL decode, ToTensor."""
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.RandomHorizontalFlip(), transforms.ToTensor()])
    ds = datasets.ImageFolder(train_dir, transform=tf)
    return DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=num_workers, drop_last=True,
                      persistent_workers=num_workers > 0)
