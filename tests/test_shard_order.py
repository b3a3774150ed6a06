"""data.shuffle=shards: the shard-aware train order (issue 45, item 2), in partition.py and in
every loader that follows it (real DALI CPU pipelines, real webdataset workers over real tars)."""

import numpy as np
import pytest
import torch

from vae_dist.config import DataConfig, build_config
from vae_dist.data.loaders import CachedLoader, build_loader
from vae_dist.data.pack import PackOptions, pack
from vae_dist.data.partition import (
    epoch_order,
    epoch_seed,
    rank_sample_range,
    rank_shards,
    resolve_shuffle,
    shard_of,
    shards_in_use,
    steps_per_epoch,
)
from vae_dist.data.shards import ShardSet
from vae_dist.data.shuffle_quality import layout, order_tv
from vae_dist.data.torch_loaders import WebDatasetLoader, epoch_plan
from vae_dist.errors import ConfigError

from .conftest import needs_webdataset, with_loader

CPU = torch.device("cpu")
COUNTS = [37] * 26 + [11]  # 973 samples in 27 shards, the last one short, as a pack leaves it


def _order(epoch, rank, world, block=2, seed=7, counts=COUNTS, flip=True, train=True):
    return epoch_order(epoch, sum(counts), rank, world, train, seed, flip, shuffle="shards", counts=counts, block=block)


def test_each_sample_at_most_once_per_epoch_in_disjoint_rank_parts_of_global_size():
    # issue 45: shards order partitions the epoch like the global one, with the same counts and steps
    count = sum(COUNTS)
    for world in (1, 2, 3, 5):
        parts = [_order(0, r, world)[0] for r in range(world)]
        everything = np.concatenate(parts)
        assert len(everything) == len(set(everything.tolist())) == count  # each once, none lost
        for r, part in enumerate(parts):
            glob = epoch_order(0, count, r, world, True, 7, True)[0]
            lo, hi = rank_sample_range(count, r, world)
            assert len(part) == hi - lo and abs(len(part) - len(glob)) <= 1
            # the step count rests on count // world, which every part holds in either order
            assert len(part) >= steps_per_epoch(count, 16, r, world, True) * 16


def test_each_rank_reads_about_one_worldth_of_the_shards_in_blocks():
    # issue 45: a rank's part is ~1/world of the shards (+ the boundary shards), in blocks of `block` shards
    world, block = 4, 3
    used = [rank_shards(0, COUNTS, r, world, 7, shuffle="shards", block=block) for r in range(world)]
    assert all(len(u) <= -(-len(COUNTS) // world) + 1 for u in used), used
    assert sum(len(u) for u in used) <= len(COUNTS) + world - 1  # a shard is split only at a rank boundary
    assert all(len(rank_shards(0, COUNTS, r, world, 7)) == len(COUNTS) for r in range(world))  # global: all of them
    ids = _order(0, 1, world, block=block)[0]
    shards = shard_of(COUNTS)[ids]
    group = {s: n // block for n, s in enumerate(shards_in_use(ids, COUNTS))}  # the block each shard is in
    blocks = np.array([group[s] for s in shards.tolist()])
    assert (np.diff(blocks) >= 0).all()  # a block's samples are all read before the next block's
    assert (np.diff(shards) != 0).sum() > len(used[1])  # and shuffled within it (not shard after shard)
    assert rank_shards(0, COUNTS, 1, world, 7, shuffle="shards", block=block, start=100) == \
        shards_in_use(ids[100:], COUNTS)  # a resumed epoch fetches from its position on


def test_deterministic_in_seed_epoch_world_and_new_each_epoch():
    # issue 45: the order is a function of (seed, epoch, world) alone, and another each epoch
    a, b = _order(3, 1, 3), _order(3, 1, 3)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(_order(4, 1, 3)[0], a[0])
    assert not np.array_equal(_order(3, 1, 3, seed=8)[0], a[0])
    first = [rank_shards(e, COUNTS, 0, 3, 7, shuffle="shards", block=2)[0] for e in range(6)]
    assert len(set(first)) > 1  # the shard order itself changes between epochs
    # the flips are today's (one stream per rank and epoch), and val is untouched
    assert np.array_equal(a[1], epoch_order(3, sum(COUNTS), 1, 3, True, 7, True)[1])
    val = _order(3, 1, 3, train=False, flip=False)  # the loaders never flip val
    assert np.array_equal(val[0], np.arange(*rank_sample_range(sum(COUNTS), 1, 3)))


def test_global_order_is_unchanged():
    # issue 45: shuffle=global is byte for byte the permutation runs used before the option
    count = sum(COUNTS)
    for rank in range(3):
        ids, flips = epoch_order(2, count, rank, 3, True, 7, True)
        assert np.array_equal(ids, np.random.default_rng(epoch_seed(7, 2)).permutation(count)[rank::3])
        ids2, _ = epoch_order(2, count, rank, 3, True, 7, True, shuffle="global", counts=COUNTS, block=4)
        assert np.array_equal(ids, ids2)
    plan = epoch_plan(COUNTS, 16, 10, 2, 1, 3, True, 7, True, 64)
    assert plan[2] != list(range(len(COUNTS))) and len(plan[2]) == len(COUNTS)  # every shard, in a shuffled order


def test_resolve_shuffle_keeps_global_where_the_data_fits():
    # issue 45: auto picks shards only for remote data larger than the shard cache
    gib = 2**30
    assert resolve_shuffle("auto", 200 * gib, None, remote=False)[0] == "global"
    assert resolve_shuffle("auto", 2 * gib, 4 * gib, remote=True)[0] == "global"
    mode, why = resolve_shuffle("auto", 8 * gib, 4 * gib, remote=True)
    assert mode == "shards" and why == ("the shards (8.00 GiB) do not fit the shard cache (4.00 GiB): each rank "
                                        "reads its own blocks of shards per epoch")
    assert resolve_shuffle("global", 8 * gib, 4 * gib, remote=True) == ("global", "data.shuffle=global")
    assert resolve_shuffle("shards", 0, None, remote=False) == ("shards", "data.shuffle=shards")


def test_config_keys_are_checked():
    # issue 45: data.shuffle and data.shuffle_block are refused in one line naming the key
    with pytest.raises(ConfigError, match=r"^config key 'data.shuffle' must be one of \['auto', 'global', 'shards'\], "
                                          r"got 'random'$"):
        build_config(None, ["--data.shuffle=random"])
    with pytest.raises(ConfigError, match=r"^config key 'data.shuffle_block' must be positive, got 0$"):
        build_config(None, ["--data.shuffle_block=0"])
    cfg = build_config(None, ["--data.shuffle=shards", "--data.shuffle_block=4"])
    assert (cfg.data.shuffle, cfg.data.shuffle_block) == ("shards", 4)


def test_batch_class_mix_orders_global_best_and_small_blocks_worst_on_class_sorted_shards():
    # issue 45: the measured statistic orders global < shards block 16 < block 1 on class-sorted shards
    labels, counts = layout(200, 500, 1000, sorted_by_class=True)
    tv = {block: order_tv(labels, counts, 64, 1, "shards", block, epochs=1)[0] for block in (1, 16)}
    glob = order_tv(labels, counts, 64, 1, "global", 1, epochs=1)[0]
    assert glob < tv[16] - 0.05 < tv[1] - 0.1, (glob, tv)
    assert tv[1] > 0.97  # a batch from one shard: 2 classes of 200
    # shards as `vae-dist pack` writes them (shuffled across shards) lose nothing measurable
    labels, counts = layout(200, 500, 1000, sorted_by_class=False)
    assert abs(order_tv(labels, counts, 64, 1, "shards", 1, epochs=1)[0] - glob) < 0.01


def test_cached_loader_follows_the_shards_order():
    # issue 45: the RAM/GPU cache serves the streaming loaders' shards order, and resumes in it
    counts = [20] * 9 + [12]
    n = sum(counts)

    def loader(rank):
        return CachedLoader(torch.zeros(n, 3, 2, 2, dtype=torch.uint8), torch.arange(n), 8, rank=rank, world=2, seed=3,
                            shuffle="shards", shuffle_block=2, counts=counts)

    for rank in (0, 1):
        got = torch.cat([y for _, y in loader(rank).epoch(5)]).numpy()
        want = epoch_order(5, n, rank, 2, True, 3, True, shuffle="shards", counts=counts, block=2)[0]
        assert np.array_equal(got, want[:len(got)]) and len(got) == loader(rank).steps_per_epoch * 8
        tail = torch.cat([y for _, y in loader(rank).epoch(5, skip=4)]).numpy()
        assert np.array_equal(tail, got[4 * 8:])


@pytest.fixture(scope="module")
def ten_shards(sample_root, tmp_path_factory):
    """The sample train split (200) in 10 shards of 20: enough shards for ranks to read different ones."""
    out = tmp_path_factory.mktemp("ten-shards")
    pack(sample_root, out, PackOptions(shard_size=20, workers=2, splits=("train",)))
    return out


def _ids_by_image(cfg, shards):
    """{image bytes: sample id}, from the split read in order by the same loader kind (same decoder)."""
    ordered = build_loader(ShardSet.open(shards), cfg, "train", 20, rank=0, world=1, device=CPU, train=False, seed=0)
    images = torch.cat([x for x, _ in ordered.epoch(0)])
    ordered.close()
    return {img.numpy().tobytes(): i for i, img in enumerate(images)}


@pytest.mark.parametrize("loader", with_loader("dali", "webdataset"))
def test_loaders_follow_the_shards_order_and_resume_exactly(ten_shards, loader):
    # issue 45: DALI (CPU) and webdataset serve partition.epoch_order's shards order; skip=k gives batches k..
    cfg = DataConfig(shards=str(ten_shards), loader=loader, num_threads=2, flip=False, shuffle="shards",
                     shuffle_block=2)
    reference = _ids_by_image(cfg, ten_shards)
    counts = ShardSet.open(ten_shards).files("train").counts
    for rank in (0, 1):
        ld = build_loader(ShardSet.open(ten_shards), cfg, "train", 16, rank=rank, world=2, device=CPU, train=True, seed=4)
        full = [(x.clone(), y.clone()) for x, y in ld.epoch(1)]
        assert len(full) == ld.steps_per_epoch == 6  # 100 per rank: the global order's 6 batches of 16
        got = [reference[img.numpy().tobytes()] for x, _ in full for img in x]
        want = epoch_order(1, 200, rank, 2, True, 4, False, shuffle="shards", counts=counts, block=2)[0]
        assert got == want[:96].tolist()
        resumed = build_loader(ShardSet.open(ten_shards), cfg, "train", 16, rank=rank, world=2, device=CPU, train=True,
                               seed=4)  # a fresh loader, as after a restart
        tail = list(resumed.epoch(1, skip=2))
        assert len(tail) == 4
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[2:], tail))
        ld.close()
        resumed.close()


@needs_webdataset
def test_webdataset_rank_reads_only_its_shards(ten_shards, tmp_path):
    # issue 45: in shards mode a webdataset rank opens only the shards its samples lie in: the others may be absent
    files = ShardSet.open(ten_shards).files("train")
    for rank in (0, 1):
        mine = rank_shards(2, files.counts, rank, 2, 4, shuffle="shards", block=2, stop=6 * 16)
        assert 5 <= len(mine) <= 6  # half the shards, and one at the boundary
        paths = [tar if s in mine else str(tmp_path / f"absent-{s}.tar") for s, tar in enumerate(files.tars)]
        ld = WebDatasetLoader(paths, files.counts, 16, rank=rank, world=2, num_workers=0, seed=4, shuffle="shards",
                              shuffle_block=2)
        labels = [y for _, y in ld.epoch(2)]
        assert len(labels) == 6
        assert len(list(ld.epoch(2, skip=5))) == 1
    with pytest.raises(FileNotFoundError):  # global order: every rank reads every shard, the absent ones too
        list(WebDatasetLoader(paths, files.counts, 16, rank=1, world=2, num_workers=0, seed=4).epoch(2))
