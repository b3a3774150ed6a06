"""How a split is divided among ranks and batches; shared by every loader."""

from __future__ import annotations

import numpy as np

from vae_dist.errors import DataError, counted


def rank_sample_range(count: int, rank: int, world: int) -> tuple[int, int]:
    """The samples that rank `rank` of `world` reads (DALI's shard_id/num_shards rule)."""
    return count * rank // world, count * (rank + 1) // world


def steps_per_epoch(count: int, batch_size: int, rank: int, world: int, train: bool) -> int:
    """train: full batches only, and as many on every rank as on the smallest part, so no
    rank waits in a collective for another. val: every sample of this rank once."""
    if train:
        smallest = count // world
        if smallest < batch_size:
            raise DataError(
                f"{counted(count, 'sample')} over {counted(world, 'process', 'processes')} give {smallest} per process, "
                f"fewer than one batch of {batch_size}: lower train.batch_size"
            )
        return smallest // batch_size
    lo, hi = rank_sample_range(count, rank, world)
    return -(-(hi - lo) // batch_size)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of an epoch's data order: the same on every rank, so the ranks' parts partition it."""
    return seed * 100003 + epoch


def rank_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of a rank's own randomness in an epoch (buffer shuffle, flips), below 2**31 for DALI."""
    return (seed * 1000003 + epoch * 1009 + rank) % (2**31)


def epoch_order(epoch: int, count: int, rank: int, world: int, train: bool, seed: int,
                flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """A rank's sample ids for an epoch and their mirror flags, for the DALI loader and the
    cache alike. train: a slice `[rank::world]` of one global permutation per epoch (the same
    on every rank); val: the rank's contiguous part in order. Functions of (seed, epoch, rank)
    alone, so a resumed epoch sees the same batches."""
    if train:
        ids = np.random.default_rng(epoch_seed(seed, epoch)).permutation(count)[rank::world]
    else:
        ids = np.arange(*rank_sample_range(count, rank, world))
    rng = np.random.default_rng(rank_seed(seed, epoch, rank))
    flips = (rng.random(len(ids)) < 0.5) if flip else np.zeros(len(ids), dtype=bool)
    return ids, flips
