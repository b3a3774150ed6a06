"""NVIDIA DALI over the shards: decode (GPU 'mixed' or CPU), flip, to uint8 NCHW.

The order of the samples is ours, not the reader's: the shards' `.idx` files say where every
JPEG lies in its tar, the tars are memory-mapped, and an `external_source` feeds DALI the
bytes of this rank's next batch. That buys three things a per-epoch `readers.webdataset`
pipeline could not give together:
- one pipeline for the whole run (built again only to jump, e.g. on resume): nothing is
  rebuilt, and nothing leaked, per epoch (DALI leaks ~0.5 MiB of host memory per build);
- a global shuffle: each epoch is a permutation of the whole split (the same on every rank,
  each rank its slice `perm[rank::world]`), as in the GPU cache, instead of a tar order plus
  a shuffle buffer (or, with data.shuffle=shards, blocks of shards per rank: partition.py);
- exact resume: the order and the flips are functions of (seed, epoch, rank) alone, so a
  run resumed at batch k of an epoch sees the very batches an unbroken run would have.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Iterator

import numpy as np
import torch

from vae_dist.data.partition import epoch_order, rank_seed, steps_per_epoch
from vae_dist.data.shards import ShardIndex, damaged_sample, undecodable  # noqa: F401 - ShardIndex: re-exported
from vae_dist.errors import DataError

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator

    HAVE_DALI = True
except ImportError:  # DALI ships for Linux only; the webdataset loader takes over
    HAVE_DALI = False


class _BatchStream:
    """The endless sequence of this rank's batches from (epoch, batch) on, as DALI's
    external_source wants it: (jpeg bytes, labels, mirror flags), one list each. It holds no
    reference to its loader, so a dropped loader frees its pipeline (and DALI's threads) at once."""

    def __init__(self, index: ShardIndex, order, batch_size: int, steps: int, epoch: int, batch: int,
                 fed: collections.deque, feed=None):
        self.index, self.order, self.batch_size, self.steps = index, order, batch_size, steps
        self.epoch, self.batch = epoch, batch
        self.fed = fed  # the sample ids of the last batches handed to DALI: where a decode error lies
        self.feed = feed  # tars at a URL, streamed: fetched ahead, unmapped behind (fetch.StreamFeed)
        self._start_epoch(epoch, batch)

    def _start_epoch(self, epoch: int, batch: int) -> None:
        self._ids, self._flips = self.order(epoch)
        if self.feed is not None:
            self.feed.start(self._ids[:self.steps * self.batch_size], self.batch_size, batch)

    def __iter__(self):
        return self

    def __next__(self):
        if self.batch >= self.steps:
            if self.feed is not None:  # the old epoch's last tars, before its plan is forgotten
                self.index.release(self.feed.done_before(self.steps + 1))
            self.epoch, self.batch = self.epoch + 1, 0
            self._start_epoch(self.epoch, 0)
        rows = slice(self.batch * self.batch_size, (self.batch + 1) * self.batch_size)
        ids = self._ids[rows]
        if self.feed is not None:  # DALI copied the batches before this one: their tars may go
            self.index.release(self.feed.done_before(self.batch))
            for t in dict.fromkeys(self.index.tar[ids].tolist()):  # each opened as soon as it is here
                self.index.open([t], path_of=self.feed.path)
        self.batch += 1
        self.fed.append(ids)
        # labels and flags as one dense (n, 1) array each; the JPEGs as views into the tars
        return (self.index.jpegs(ids), self.index.labels[ids].reshape(-1, 1),
                self._flips[rows].astype(np.int32).reshape(-1, 1))


def _pipeline(stream, decode, image_size, hw_decoder_load, fancy_upsampling=True, resize=False):
    jpegs, labels, mirror = fn.external_source(source=stream, num_outputs=3, batch=True,
                                               dtype=[types.UINT8, types.INT32, types.INT32])
    extra = {"hw_decoder_load": hw_decoder_load} if decode == "mixed" else {}
    # output_type=RGB: grayscale/CMYK JPEGs still give 3 channels, so batches are dense.
    # jpeg_fancy_upsampling (data.fancy_upsampling): nvJPEG upsamples 4:2:0 chroma as libjpeg-turbo
    # does (smoothly), so GPU- and CPU-decoded pixels agree; DALI's default (off on the GPU)
    # differed by more than 8 levels on ~1.3% of subpixels of the sample set's JPEGs.
    images = fn.decoders.image(jpegs, device=decode, output_type=types.RGB, jpeg_fancy_upsampling=fancy_upsampling,
                               **extra)
    # pack made every image SxS; the crop (padding if ever smaller) only guarantees a dense
    # batch without paying for a resize of images that are already the right size. An indexed
    # set's images vary (resize=True): the shorter side to S first, on the decode's device, then
    # the same crop takes the centre.
    if resize:
        images = fn.resize(images, resize_shorter=image_size, antialias=True)
    images = fn.crop_mirror_normalize(
        images, crop=(image_size, image_size), out_of_bounds_policy="pad", mirror=mirror,
        dtype=types.UINT8, output_layout="CHW",
    )
    return images, fn.reshape(labels, shape=[])


# Decorated only where DALI imported: without it this module still imports, and
# data.loader=auto falls back to the webdataset loader.
shard_pipeline = pipeline_def(enable_conditionals=False)(_pipeline) if HAVE_DALI else None


class DaliLoader:
    """Batches (images uint8 NCHW, labels int64) of one split for one rank.

    train=True: a new order every epoch (`shuffle`: a global permutation, or blocks of shards), flipped,
    exactly `steps_per_epoch` full batches on every rank (the smallest rank part decides, so no rank
    waits in a collective).
    train=False: every sample of the rank's contiguous part once, in shard order, the last
    batch partial. `limit`: only the split's first `limit` samples (the same ones for any world).
    """

    def __init__(self, paths, index_paths, count, batch_size, *, rank=0, world=1, train=True,
                 gpu_id: int | None = None, num_threads=4, prefetch=2, seed=0, flip=True,
                 image_size=64, hw_decoder_load=0.65, limit: int | None = None, fancy_upsampling: bool = True,
                 shuffle: str = "global", shuffle_block: int = 1, label_paths=None, resize: bool = False,
                 fetch=None, fetch_ahead: int = 4):
        if not HAVE_DALI:
            raise DataError("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
        # label_paths: an indexed set's side files; fetch: the tars stream from a URL (fetch.TarFetch)
        self.index = ShardIndex(paths, index_paths, label_paths, fetch=fetch)
        self.fetch, self.fetch_ahead = fetch, fetch_ahead
        self._feed = None
        if len(self.index) != count:
            raise DataError(f"the .idx files of {paths[0]}... list {len(self.index)} samples, manifest says {count}")
        # limit: the first `limit` samples only (val's train.eval_images), divided among the ranks
        self.count, self.batch_size = min(count, limit) if limit is not None else count, batch_size
        self.rank, self.world, self.train = rank, world, train
        self.gpu_id, self.num_threads, self.prefetch = gpu_id, num_threads, prefetch
        self.seed, self.flip, self.image_size = seed, flip and train, image_size
        self.hw_decoder_load, self.fancy_upsampling, self.resize = hw_decoder_load, fancy_upsampling, resize
        # the train order (partition.epoch_order): 'global', or 'shards' in blocks of `shuffle_block` shards
        self.shuffle, self.shuffle_block = shuffle, shuffle_block
        self.shard_counts = np.bincount(self.index.tar[:self.count].astype(np.int64), minlength=len(self.index.tar_paths))
        self.steps_per_epoch = steps_per_epoch(self.count, batch_size, rank, world, train)
        self._it = None
        self._position = None  # (epoch, batch) the pipeline delivers next
        self._fed = collections.deque(maxlen=prefetch + 4)  # DALI reads at most `prefetch` batches ahead
        self.builds = 0  # pipelines built so far: one per run, more only on a jump

    def _build(self, epoch: int, batch: int):
        decode = "mixed" if self.gpu_id is not None else "cpu"
        if self.fetch is not None:
            from vae_dist.data.fetch import StreamFeed
            from vae_dist.data.partition import shard_of

            self._feed = StreamFeed(self.fetch, self.fetch_ahead, shard_of(self.shard_counts))
        order = functools.partial(epoch_order, count=self.count, rank=self.rank, world=self.world, train=self.train,
                                  seed=self.seed, flip=self.flip, shuffle=self.shuffle, counts=self.shard_counts,
                                  block=self.shuffle_block)
        stream = _BatchStream(self.index, order, self.batch_size, self.steps_per_epoch, epoch, batch, self._fed,
                              self._feed)
        pipe = shard_pipeline(
            stream, decode, self.image_size, self.hw_decoder_load, self.fancy_upsampling, self.resize,
            batch_size=self.batch_size, num_threads=self.num_threads,
            device_id=self.gpu_id,  # None: a CPU-only pipeline
            prefetch_queue_depth=self.prefetch, seed=rank_seed(self.seed, epoch, self.rank),
        )
        pipe.build()
        self.builds += 1
        return DALIGenericIterator([pipe], ["images", "labels"], size=-1)

    def _normal(self, epoch: int, batch: int) -> tuple[int, int]:
        """(epoch, batch) as the stream counts it: the end of a pass is the next one's start.
        Every val pass is the same, so for val that start is (0, 0) again, and an evaluation
        after a full one finds the pipeline where it wants it (no rebuild)."""
        if batch >= self.steps_per_epoch:
            epoch, batch = epoch + 1, 0
        return (epoch, batch) if self.train else (0, batch)

    def close(self) -> None:
        """Shuts the pipeline down now (its threads, pinned and device buffers), while CUDA is
        still up: left to interpreter teardown, DALI can abort in CUDA's (DALI issue 6166),
        turning a finished run's exit 0 into SIGABRT."""
        if self._it is not None:
            for pipe in getattr(self._it, "_pipes", []):
                pipe._shutdown()
        if self._feed is not None:
            self._feed.close()
            self.index.release(range(len(self.index.tar_paths)))  # mapped again from the cache as needed
        self._it = self._position = self._feed = None

    def fetch_stats(self) -> dict | None:
        """The link's stats of a loader streaming from a URL (fetch.StreamFeed), else None."""
        return self._feed.stats() if self._feed is not None else None

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yields the epoch's batches after the first `skip` (a resumed run's position)."""
        start = self._normal(epoch, skip)
        if self._position != start:  # a jump (resume, an abandoned pass): a pipeline from here
            self.close()
            # the iterator runs the pipeline's first batches as it is made: a damaged one fails here
            self._it = self._named_if_damaged(lambda: self._build(*start))
        for b in range(skip, self.steps_per_epoch):
            out = self._named_if_damaged(lambda: next(self._it))[0]
            self._position = self._normal(epoch, b + 1)
            yield out["images"], out["labels"].long()

    def _named_if_damaged(self, call):
        """call(), where DALI's pipeline error from a sample that does not decode is that sample's one line."""
        try:
            return call()
        except RuntimeError:  # DALI's pipeline error; the pipeline is no longer usable
            self._raise_if_a_sample_is_damaged()
            raise  # every JPEG decodes on the host: not a damaged sample

    def _raise_if_a_sample_is_damaged(self) -> None:
        """After DALI failed, decodes the JPEGs of the batches it was given last, one by one on
        the host, and names the first that does not decode (the hot path pays nothing for this)."""
        self.close()
        for ids in self._fed:
            for sample_id in ids.tolist():
                reason = undecodable(bytes(self.index.jpegs(np.array([sample_id]))[0]), self.index.ext(sample_id))
                if reason is not None:
                    raise damaged_sample(*self.index.where(sample_id), reason) from None
