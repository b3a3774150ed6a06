"""The shuffle quality a shard-aware epoch order gives up, measured on labels alone.

`python -m vae_dist.data.shuffle_quality` prints the table docs/design.md quotes: the mean
total-variation distance between a batch's class histogram and the whole split's, for the
global permutation and for data.shuffle=shards at several blocks, on a Tiny-ImageNet-like label
layout (200 classes x 500, shards of 1000) as `vae-dist pack` writes it (shuffled across shards)
and class-sorted (each shard 2 classes: the worst case of shards written in class order).
"""

from __future__ import annotations

import argparse

import numpy as np

from vae_dist.data.partition import epoch_order, steps_per_epoch


def batch_class_tv(labels: np.ndarray, batches: list[np.ndarray], num_classes: int) -> float:
    """How far a batch's class mix departs from the whole split's: the mean, over `batches` (sample
    ids), of the total-variation distance between the batch's class histogram and the split's
    (0: the same mix; 1: no class in common). Even a uniformly random batch of B samples is far
    from 0 (B=64 over 200 balanced classes: ~0.73), so compare orders at one batch size."""
    whole = np.bincount(labels, minlength=num_classes) / len(labels)
    tvs = [0.5 * np.abs(np.bincount(labels[ids], minlength=num_classes) / len(ids) - whole).sum() for ids in batches]
    return float(np.mean(tvs))


def layout(classes: int, per_class: int, shard_size: int, sorted_by_class: bool, seed: int = 0):
    """(labels in sample-id order, samples per shard): the packed order, shuffled (pack's global
    shuffle) or sorted by class."""
    labels = np.repeat(np.arange(classes), per_class)
    if not sorted_by_class:
        labels = np.random.default_rng(seed).permutation(labels)
    count = len(labels)
    counts = [min(shard_size, count - lo) for lo in range(0, count, shard_size)]
    return labels, counts


def order_tv(labels, counts, batch_size: int, world: int, shuffle: str, block: int, epochs: int = 2,
             seed: int = 0) -> tuple[float, float]:
    """(per-rank batch TV, global batch TV) over `epochs` epochs: a rank's batch of `batch_size`,
    and the union of every rank's batch k (the batch whose gradient DDP averages)."""
    count, classes = len(labels), int(labels.max()) + 1
    steps = steps_per_epoch(count, batch_size, 0, world, True)
    per_rank, whole = [], []
    for epoch in range(epochs):
        parts = [epoch_order(epoch, count, r, world, True, seed, False, shuffle=shuffle, counts=counts,
                             block=block)[0][:steps * batch_size].reshape(steps, batch_size) for r in range(world)]
        per_rank += [p[k] for p in parts for k in range(steps)]
        whole += [np.concatenate([p[k] for p in parts]) for k in range(steps)]
    return batch_class_tv(labels, per_rank, classes), batch_class_tv(labels, whole, classes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, default=200)
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--blocks", type=int, nargs="+", default=[1, 4, 16])
    args = ap.parse_args()
    orders = [("global", 1)] + [("shards", b) for b in args.blocks]
    print(f"mean TV(batch classes, split classes), {args.classes} classes x {args.per_class}, shards of "
          f"{args.shard_size}, batch {args.batch_size} per rank; per rank / global batch")
    head = " | ".join(f"{name} world {w}" for name in ("packed", "class-sorted") for w in args.worlds)
    print(f"| order | {head} |")
    for shuffle, block in orders:
        cells = []
        for sorted_by_class in (False, True):
            labels, counts = layout(args.classes, args.per_class, args.shard_size, sorted_by_class)
            for w in args.worlds:
                rank_tv, global_tv = order_tv(labels, counts, args.batch_size, w, shuffle, block)
                cells.append(f"{rank_tv:.3f}" if w == 1 else f"{rank_tv:.3f} / {global_tv:.3f}")
        name = "global" if shuffle == "global" else f"shards, block {block}"
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
