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
