"""How a split is divided among ranks and batches; shared by every loader."""

from __future__ import annotations

import numpy as np

from vae_dist.errors import DataError, counted


def rank_sample_range(count: int, rank: int, world: int) -> tuple[int, int]:
    """The samples that rank `rank` of `world` reads (DALI's shard_id/num_shards rule)."""
    return count * rank // world, count * (rank + 1) // world


def check_batch_fits(count: int, batch_size: int, world: int, setting: str = "train.batch_size") -> None:
    """Refuses a per-process batch larger than the smallest rank's part of the train split.
    `setting` is where that batch came from as the user wrote it (`train.global_batch_size=256`,
    `train.batch_size=64`): its key is what the message asks to lower."""
    smallest = count // world
    if smallest < batch_size:
        key = setting.split("=")[0]
        fewer = " or launch fewer processes" if world > 1 else ""
        raise DataError(
            f"{counted(count, 'train sample')} over {counted(world, 'process', 'processes')} give {smallest} per "
            f"process, fewer than one batch of {batch_size} ({setting}): lower {key}{fewer}")


def steps_per_epoch(count: int, batch_size: int, rank: int, world: int, train: bool) -> int:
    """train: full batches only, and as many on every rank as on the smallest part, so no
    rank waits in a collective for another. val: every sample of this rank once."""
    if train:
        check_batch_fits(count, batch_size, world)  # training checked it before, naming the key the user set
        return count // world // batch_size
    lo, hi = rank_sample_range(count, rank, world)
    return -(-(hi - lo) // batch_size)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of an epoch's data order: the same on every rank, so the ranks' parts partition it."""
    return seed * 100003 + epoch


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of a rank's own randomness in an epoch (buffer shuffle, flips), below 2**31 for DALI."""
    return (seed * 1000003 + epoch * 1009 + rank) % (2**31)


SHUFFLES = ("global", "shards")  # the epoch orders a run can take (data.shuffle, once `auto` is resolved)


def resolve_shuffle(setting: str, data_bytes: int, cache_bytes: int | None, remote: bool) -> tuple[str, str]:
    """(order, why) for data.shuffle. `auto`: the global permutation wherever every rank can hold the
    split's bytes (a local folder, or remote data that fits the shard cache of `cache_bytes`; None:
    unbounded), else `shards`: with a global permutation every rank would fetch every shard every
    epoch, a bounded cache would evict and fetch it again, so the link, not the GPU, would set the pace."""
    if setting != "auto":
        return setting, f"data.shuffle={setting}"
    if not remote:
        return "global", "local shards: one global permutation per epoch"
    gib = 2**30
    if cache_bytes is None or data_bytes <= cache_bytes:
        return "global", (f"the shards ({data_bytes / gib:.2f} GiB) fit the shard cache: one global permutation "
                          f"per epoch")
    return "shards", (f"the shards ({data_bytes / gib:.2f} GiB) do not fit the shard cache ({cache_bytes / gib:.2f} "
                      f"GiB): each rank reads its own blocks of shards per epoch")


def starts(sizes) -> np.ndarray:
    """Where each of consecutive runs of `sizes` starts: [0, s0, s0+s1, ...]. Of samples per shard:
    each shard's first sample id (samples are numbered shard after shard, in the manifest's order)."""
    return np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)


def shard_of(counts) -> np.ndarray:
    """The shard each sample id lies in."""
    return np.repeat(np.arange(len(counts)), counts)


def _shard_order_ids(epoch: int, counts, rank: int, world: int, seed: int, block: int) -> np.ndarray:
    """A rank's train sample ids in `shards` order (MosaicML's block shuffle, made per rank): the
    shards permuted by the epoch's seed (the same on every rank), their samples one stream in that
    order, the rank's contiguous part of it (rank_sample_range, so as many samples as the global
    order gives), shuffled within consecutive blocks of `block` shards (a shard the part holds only
    some of counts as one), so a rank needs at most `block` shards at once and about 1/world of them
    per epoch."""
    counts = np.asarray(counts, dtype=np.int64)
    shards = np.random.default_rng(epoch_seed(seed, epoch)).permutation(len(counts))
    stream = np.concatenate([np.arange(f, f + c) for f, c in zip(starts(counts)[shards], counts[shards])]
                            or [np.zeros(0, dtype=np.int64)])
    ids = stream[slice(*rank_sample_range(len(stream), rank, world))]
    shard = shard_of(counts)[ids]
    nth = np.concatenate([[0], np.cumsum(shard[1:] != shard[:-1])])  # shard ordinal in the part
    rng = np.random.default_rng([rank_seed(seed, epoch, rank), 1])  # apart from the flips' stream
    for lo, hi in _runs(nth // block):
        rng.shuffle(ids[lo:hi])
    return ids


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) of each run of equal consecutive values."""
    cuts = np.flatnonzero(values[1:] != values[:-1]) + 1
    edges = [0, *cuts.tolist(), len(values)]
    return [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


def epoch_order(epoch: int, count: int, rank: int, world: int, train: bool, seed: int,
                flip: bool, *, shuffle: str = "global", counts=None, block: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """A rank's sample ids for an epoch and their mirror flags, for the DALI loader and the
    cache alike. train, shuffle='global': a slice `[rank::world]` of one global permutation per
    epoch (the same on every rank); shuffle='shards': blocks of shards per rank (see
    _shard_order_ids; `counts`: samples per shard, summing to `count`; `block`: shards per block).
    val: the rank's contiguous part in order. Functions of (seed, epoch, rank, world) alone, so a
    resumed epoch sees the same batches."""
    if shuffle not in SHUFFLES:
        raise ValueError(f"unknown epoch order {shuffle!r}")
    if train and shuffle == "shards":
        if counts is None or sum(counts) != count:
            raise ValueError(f"shuffle='shards' needs the samples per shard, summing to {count}")
        ids = _shard_order_ids(epoch, counts, rank, world, seed, block)
    elif train:
        ids = np.random.default_rng(epoch_seed(seed, epoch)).permutation(count)[rank::world]
    else:
        ids = np.arange(*rank_sample_range(count, rank, world))
    rng = np.random.default_rng(rank_seed(seed, epoch, rank))
    flips = (rng.random(len(ids)) < 0.5) if flip else np.zeros(len(ids), dtype=bool)
    return ids, flips


def shards_in_use(ids: np.ndarray, counts) -> list[int]:
    """The shards that sample ids lie in, in order of first use."""
    shards = shard_of(counts)[ids]
    _, first = np.unique(shards, return_index=True)
    return shards[np.sort(first)].tolist()


def rank_shards(epoch: int, counts, rank: int, world: int, seed: int, *, shuffle: str = "global", block: int = 1,
                start: int = 0, stop: int | None = None) -> list[int]:
    """The train shards a rank reads in an epoch, in order of first use: what a prefetcher fetches,
    and in which order. `start`/`stop`: positions in the rank's order (a resumed epoch's skip x batch
    size; steps_per_epoch x batch size, past which no sample is read)."""
    ids, _ = epoch_order(epoch, int(sum(counts)), rank, world, True, seed, False, shuffle=shuffle, counts=counts,
                         block=block)
    return shards_in_use(ids[start:stop], counts)
