"""How a split is divided among ranks and batches; shared by every loader."""

from __future__ import annotations

from vae_dist.errors import DataError


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
                f"{count} samples over {world} processes give {smallest} per process, fewer than "
                f"one batch of {batch_size}: lower train.batch_size"
            )
        return smallest // batch_size
    lo, hi = rank_sample_range(count, rank, world)
    return -(-(hi - lo) // batch_size)
