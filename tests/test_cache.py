"""The decoded-split cache (data.cache): the GPU cache's code path, run on the host device."""

import resource

import pytest
import torch

from vae_dist.config import DataConfig
from vae_dist.data.loaders import CachedLoader, build_loader, choose_cache
from vae_dist.data.shards import ShardSet

from .conftest import CUDA, TINY_MODEL, needs_dali, needs_loader, run_cli


def _loader(n=96, bs=8, rank=0, world=2, **kw):
    images = torch.zeros(n, 3, 4, 4, dtype=torch.uint8)
    images[..., 2:] = 255  # right half white: a flip is visible
    return CachedLoader(images, torch.arange(n), bs, rank=rank, world=world, **kw)


def _labels(loader, epoch, skip=0):
    return [y.tolist() for _, y in loader.epoch(epoch, skip)]


def test_every_train_sample_once_per_epoch_across_two_ranks_in_a_new_order():
    orders = []
    for epoch in range(3):
        seen = [label for rank in (0, 1) for batch in _labels(_loader(rank=rank), epoch) for label in batch]
        assert sorted(seen) == list(range(96))  # each once: 96 = 2 ranks x 6 steps x 8
        orders.append(seen)
    assert orders[0] != orders[1] != orders[2]


def test_resume_mid_epoch_gives_identical_batches():
    full = list(_loader().epoch(4))
    resumed = list(_loader().epoch(4, skip=3))  # a fresh loader, as after a restart
    assert len(resumed) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_flip_applies_to_about_half_and_only_on_train():
    x = torch.cat([x for x, _ in _loader(n=800, bs=40, world=1).epoch(0)])
    flipped = (x[:, 0, 0, 0] == 255).float().mean().item()  # the white half moved to the left
    assert 0.4 < flipped < 0.6, flipped
    x = torch.cat([x for x, _ in _loader(n=800, bs=40, world=1, train=False).epoch(0)])
    assert (x[:, 0, 0, 0] == 0).all()
    assert x.dtype == torch.uint8  # the step makes floats


def test_auto_caches_what_fits_and_streams_what_does_not(shards):
    gpu, gib = torch.device("cuda"), 2**30  # the decision only; the free memory is given
    shard_set = ShardSet.open(shards)
    kind, why = choose_cache(shard_set, DataConfig(shards=str(shards)), gpu, free_bytes=80 * gib)
    assert kind == "gpu" and why.startswith("260 decoded images (0.00 GiB) fit in 50% of 80.0 GiB free GPU memory")
    kind, why = choose_cache(shard_set, DataConfig(shards=str(shards), cache_budget=0.0), gpu, free_bytes=80 * gib)
    assert kind == "none" and why.endswith("do not fit in 0% of 80.0 GiB free GPU memory: streaming"), why
    kind, why = choose_cache(shard_set, DataConfig(shards=str(shards)), gpu, free_bytes=1000)  # 260 x 12 KiB > 500 bytes
    assert kind == "none" and "streaming" in why
    assert choose_cache(shard_set, DataConfig(shards=str(shards)), torch.device("cpu"))[0] == "none"
    assert choose_cache(shard_set, DataConfig(shards=str(shards), cache="ram"), torch.device("cpu")) == ("ram", "data.cache=ram")


@needs_loader
def test_train_says_in_its_first_line_which_data_path_and_why(shards, tmp_path):
    auto = ["loader=gpu-cache", "fit in 50% of"] if CUDA else ["loader=", "no CUDA: streaming"]
    for cache, words in (("auto", auto), ("ram", ["loader=ram-cache", "data.cache=ram"])):
        r = run_cli("train", f"--data.shards={shards}", f"--train.out_dir={tmp_path / cache}", *TINY_MODEL,
                    "--train.batch_size=16", "--data.num_threads=1", "--log.wandb_mode=disabled",
                    "--train.max_steps=2", f"--data.cache={cache}")
        assert r.returncode == 0, r.stderr[-2000:]
        first = r.stdout.splitlines()[0]
        assert first.startswith("training: ") and all(w in first for w in words), first


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@needs_dali
@pytest.mark.parametrize("train", [True, False])
def test_dali_loader_memory_stays_flat_over_many_epochs(shards, train):
    cfg = DataConfig(shards=str(shards), loader="dali", num_threads=1)
    loader = build_loader(ShardSet.open(shards), cfg, "train" if train else "val", 16, rank=0, world=1,
                          device=torch.device("cpu"), train=train, seed=0)
    usage = []
    for epoch in range(60):
        for _ in loader.epoch(epoch):
            pass
        if epoch in (10, 59):
            usage.append(_rss_mib())
    assert usage[1] - usage[0] < 25, f"RSS grew {usage[1] - usage[0]:.0f} MiB over 50 epochs ({usage})"
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0
