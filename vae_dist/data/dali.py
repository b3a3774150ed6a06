"""NVIDIA DALI over the shards: read, decode (GPU 'mixed' or CPU), flip, to float NCHW.

Each rank reads its own contiguous part of the samples (`shard_id=rank`,
`num_shards=world`). The pipeline is rebuilt every epoch with that epoch's seed: the tar
files are visited in a new order (the same order on every rank, so the ranks' parts still
partition the data), samples are shuffled in a buffer, and a resumed run rebuilds exactly
the epoch it stopped in and skips the batches it already trained on.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from vae_dist.data.partition import epoch_seed, rank_sample_range, rank_seed, steps_per_epoch
from vae_dist.errors import DataError

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.base_iterator import LastBatchPolicy
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    HAVE_DALI = True
except ImportError:  # DALI ships for Linux only; the webdataset loader takes over
    HAVE_DALI = False


def _shard_pipeline(paths, index_paths, shard_id, num_shards, decode, image_size, shuffle, flip, as_uint8, buffer):
    jpegs, labels = fn.readers.webdataset(
        paths=paths,
        index_paths=index_paths,
        ext=["jpg", "label"],
        dtypes=[types.UINT8, types.INT32],
        missing_component_behavior="error",
        shard_id=shard_id,
        num_shards=num_shards,
        random_shuffle=shuffle,
        initial_fill=buffer,
        pad_last_batch=True,
        name="reader",
    )
    # output_type=RGB: grayscale/CMYK JPEGs still give 3 channels, so batches are dense.
    images = fn.decoders.image(jpegs, device=decode, output_type=types.RGB)
    mirror = fn.random.coin_flip(probability=0.5) if flip else 0
    # pack made every image SxS; the crop (padding if ever smaller) only guarantees a dense
    # batch without paying for a resize of images that are already the right size.
    images = fn.crop_mirror_normalize(
        images,
        crop=(image_size, image_size),
        out_of_bounds_policy="pad",
        mirror=mirror,
        dtype=types.UINT8 if as_uint8 else types.FLOAT,
        output_layout="CHW",
        mean=[0.0, 0.0, 0.0],
        std=[1.0, 1.0, 1.0] if as_uint8 else [255.0, 255.0, 255.0],
    )
    labels = fn.reshape(labels, shape=[])
    if decode == "mixed":
        labels = labels.gpu()
    return images, labels


# Decorated only where DALI imported: without it this module still imports, and
# data.loader=auto falls back to the webdataset loader.
shard_pipeline = pipeline_def(enable_conditionals=False)(_shard_pipeline) if HAVE_DALI else None


class DaliLoader:
    """Batches (images float NCHW in [0,1] or uint8, labels int64) of one split for one rank.

    train=True: shuffled, flipped, and exactly `steps_per_epoch` full batches on every rank
    (the smallest rank part decides, so no rank waits in a collective for another).
    train=False: every sample of the rank's part once, the last batch partial.
    """

    def __init__(self, paths, index_paths, count, batch_size, *, rank=0, world=1, train=True,
                 gpu_id: int | None = None, num_threads=4, prefetch=2, seed=0, flip=True,
                 image_size=64, buffer=4096, as_uint8=False):
        if not HAVE_DALI:
            raise DataError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
        self.paths, self.index_paths = list(paths), list(index_paths)
        self.count, self.batch_size = count, batch_size
        self.rank, self.world, self.train = rank, world, train
        self.gpu_id, self.num_threads, self.prefetch = gpu_id, num_threads, prefetch
        self.seed, self.flip, self.image_size = seed, flip and train, image_size
        self.buffer, self.as_uint8 = buffer, as_uint8
        lo, hi = rank_sample_range(count, rank, world)
        self.rank_count = hi - lo
        self.steps_per_epoch = steps_per_epoch(count, batch_size, rank, world, train)
        # Building a pipeline costs ~0.1 s (threads, operators, first prefetch): the next
        # epoch's is built in the background while this one runs.
        self._builder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dali-build")
        self._next: tuple[int, Future] | None = None

    def _iterator(self, epoch: int) -> DALIGenericIterator:
        ahead, self._next = self._next, None
        if ahead is not None and ahead[0] == epoch:
            return ahead[1].result()
        return self._build(epoch)

    def _build(self, epoch: int) -> DALIGenericIterator:
        order = list(range(len(self.paths)))
        if self.train:  # a new tar order each epoch, identical on all ranks
            random.Random(epoch_seed(self.seed, epoch)).shuffle(order)
        pipe = shard_pipeline(
            paths=[self.paths[i] for i in order],
            index_paths=[self.index_paths[i] for i in order],
            shard_id=self.rank,
            num_shards=self.world,
            decode="mixed" if self.gpu_id is not None else "cpu",
            image_size=self.image_size,
            shuffle=self.train,
            flip=self.flip,
            as_uint8=self.as_uint8,
            buffer=max(1, min(self.buffer, self.rank_count)),
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=self.gpu_id,  # None: a CPU-only pipeline
            prefetch_queue_depth=self.prefetch,
            seed=rank_seed(self.seed, epoch, self.rank),
        )
        pipe.build()
        policy = LastBatchPolicy.DROP if self.train else LastBatchPolicy.PARTIAL
        return DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader", last_batch_policy=policy)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields the epoch's batches after the first `skip` (a resumed run's position)."""
        it = self._iterator(epoch)
        if self.train:
            self._next = (epoch + 1, self._builder.submit(self._build, epoch + 1))
        try:
            for i, out in enumerate(it):
                if i >= self.steps_per_epoch:
                    break
                if i < skip:
                    continue
                batch = out[0]
                yield batch["images"], batch["labels"].long()
        finally:
            del it
