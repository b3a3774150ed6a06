"""Choosing and building the loader a training run uses.

Every function here takes the run's `ShardSet` (the manifest and split files, read once).
All loaders share one contract: `steps_per_epoch`, `epoch(e, skip=0)` yielding
(images uint8 NCHW on the training device, labels int64 on the host or that device), the same number of
batches on every rank for train, each sample once across ranks for val; and `close()`,
which releases what the loader holds (DALI's pipeline) before the process ends.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from vae_dist.data import available_cores, dali
from vae_dist.data.fetch import stderr_line
from vae_dist.data.partition import epoch_order, resolve_shuffle, steps_per_epoch
from vae_dist.data.shards import ShardSet
from vae_dist.data.tar_decode import decode_split_on_cpus
from vae_dist.data.torch_loaders import WebDatasetLoader, have_webdataset
from vae_dist.data.verify import verify
from vae_dist.errors import DataError, counted


def local_processes() -> int:
    """Training processes on this node (torchrun / accelerate launch export it)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def default_threads() -> int:
    """Decode threads per process: this node's cores shared by its processes."""
    return max(1, available_cores() // local_processes())


def resolve_loader_kind(kind: str) -> str:
    if kind == "auto":
        if dali.HAVE_DALI:
            return "dali"
        if have_webdataset():
            return "webdataset"
        raise DataError("no data loader: neither NVIDIA DALI (pip install nvidia-dali-cuda130) nor webdataset "
                        "(pip install webdataset) is installed")
    if kind == "dali" and not dali.HAVE_DALI:
        raise DataError("data.loader=dali but NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    return kind


def resolve_decode(decode: str, device: torch.device) -> str:
    if decode == "auto":
        return "gpu" if device.type == "cuda" else "cpu"
    if decode == "gpu" and device.type != "cuda":
        raise DataError("data.decode=gpu but training does not run on a CUDA GPU")
    return decode


def train_shuffle(shards: ShardSet, data_cfg) -> tuple[str, str]:
    """(the train order, 'global' or 'shards', why) for data.shuffle over this shard set: a local
    folder, and a set at a URL that fits the shard cache, keep the global permutation under
    `auto` (every rank reads every shard from local disk at no cost); a larger one streams in
    blocks of shards, so a rank fetches only its own."""
    cache = shards.fetch_options.cache_bytes if shards.is_remote else None
    return resolve_shuffle(data_cfg.shuffle, data_bytes=shards.shard_bytes(), cache_bytes=cache,
                           remote=shards.is_remote)


def remote_tars(shards: ShardSet, files) -> object | None:
    """How a loader reads a split's tars at a URL: None where they are local files (a local
    set, or one at a URL that fits the shard cache: all fetched now, once per process, and
    read as local files from then on); else the split's TarFetch, through which the loader
    fetches each shard as its plan reaches it (streaming)."""
    if files.fetch is None:
        return None
    if shards.fits_shard_cache():
        shards.fetch_everything(say=stderr_line)
        return None
    return files.fetch


def build_loader(shards: ShardSet, data_cfg, split: str, batch_size: int, *, rank: int, world: int,
                 device: torch.device, train: bool, seed: int, limit: int | None = None):
    """The streaming loader for `split` as configured (DALI or webdataset); `limit`: only the
    split's first `limit` samples, divided among the ranks (the same samples for any world)."""
    files = shards.files(split)
    kind = resolve_loader_kind(data_cfg.loader)
    threads = data_cfg.num_threads if data_cfg.num_threads is not None else default_threads()
    order = {"shuffle": train_shuffle(shards, data_cfg)[0], "shuffle_block": data_cfg.shuffle_block}
    fetch = remote_tars(shards, files)
    # in shards order a block's tars are read together: the first batch of a block opens them all
    ahead = max(shards.fetch_options.prefetch, data_cfg.shuffle_block if order["shuffle"] == "shards" else 0) \
        if fetch else 0
    if kind == "dali":
        gpu_id = device.index if device.index is not None else 0
        loader = dali.DaliLoader(
            files.tars, files.idxs, files.count, batch_size, rank=rank, world=world, train=train,
            gpu_id=gpu_id if resolve_decode(data_cfg.decode, device) == "gpu" else None,
            num_threads=threads, prefetch=data_cfg.prefetch, seed=seed, flip=data_cfg.flip,
            image_size=shards.image_size, hw_decoder_load=data_cfg.hw_decoder_load, limit=limit,
            fancy_upsampling=data_cfg.fancy_upsampling, label_paths=files.labels, resize=shards.resize, **order,
            fetch=fetch, fetch_ahead=ahead,
        )
        return _OnDevice(loader, device)
    return WebDatasetLoader(files.tars, files.counts, batch_size, rank=rank, world=world, train=train,
                            num_workers=threads, seed=seed, flip=data_cfg.flip,
                            buffer=data_cfg.shuffle_buffer, device=device, limit=limit, idxs=files.idxs,
                            label_paths=files.labels, image_size=shards.image_size, resize=shards.resize, **order,
                            fetch=fetch, fetch_ahead=ahead)


class _OnDevice:
    """Moves a loader's images to the training device (a no-op for GPU-decoded DALI). The
    labels stay where the loader made them: training never reads them, and a per-step copy
    from DALI's pageable host memory may wait for the GPU's queue."""

    def __init__(self, loader, device: torch.device):
        self.loader, self.device = loader, device
        self.steps_per_epoch = loader.steps_per_epoch

    def epoch(self, epoch: int, skip: int = 0):
        for images, labels in self.loader.epoch(epoch, skip):
            yield images.to(self.device, non_blocking=True), labels

    def close(self) -> None:
        self.loader.close()

    def fetch_stats(self) -> dict | None:
        return getattr(self.loader, "fetch_stats", lambda: None)()


class CachedLoader:
    """The whole split decoded once into (device) memory as uint8; an epoch is a shuffled
    gather plus a flip on the device. Tiny ImageNet's train split is 100k x 12 KiB = 1.2 GB.
    Every rank holds all of it, so each epoch is a fresh global permutation, or (shuffle='shards',
    `counts` samples per shard) the streaming loaders' blocks of shards, for the same order as theirs."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, rank=0, world=1,
                 train=True, seed=0, flip=True, shuffle="global", shuffle_block=1, counts=None):
        self.images, self.labels = images, labels
        self.batch_size, self.rank, self.world = batch_size, rank, world
        self.train, self.seed, self.flip = train, seed, flip and train
        self.shuffle, self.shuffle_block, self.counts = shuffle, shuffle_block, counts
        self.steps_per_epoch = steps_per_epoch(images.shape[0], batch_size, rank, world, train)

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        device = self.images.device
        # the same order and flips as the DALI loader, drawn for the whole epoch on the host and
        # moved once: a resumed epoch (skip > 0) gathers and flips the same images
        ids, flips = epoch_order(epoch, self.images.shape[0], self.rank, self.world, self.train, self.seed, self.flip,
                                 shuffle=self.shuffle, counts=self.counts, block=self.shuffle_block)
        perm = torch.from_numpy(ids).to(device)
        flips = torch.from_numpy(flips).to(device) if self.flip else None
        for step in range(skip, self.steps_per_epoch):
            batch = slice(step * self.batch_size, (step + 1) * self.batch_size)
            idx = perm[batch]
            x = self.images[idx]
            if flips is not None:
                x = torch.where(flips[batch].view(-1, 1, 1, 1), x.flip(-1), x)
            yield x, self.labels[idx]

    def close(self) -> None:
        pass  # plain tensors: freed with the loader


def cache_fill(data_cfg) -> str:
    """How a cache is filled: 'dali' where DALI is the loader (mixed decode on the GPU), else
    'cpu-pool': the project's own tar reader on a process pool, which needs no loader package."""
    if data_cfg.loader == "dali" or (data_cfg.loader == "auto" and dali.HAVE_DALI):
        return resolve_loader_kind(data_cfg.loader)  # data.loader=dali without DALI: its one line
    return "cpu-pool"


def decode_split(shards: ShardSet, data_cfg, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of a split as uint8 (N, 3, S, S) on `device`, in shard order."""
    count = shards.count(split)
    if cache_fill(data_cfg) == "cpu-pool":
        files = shards.files(split)
        threads = data_cfg.num_threads if data_cfg.num_threads is not None else default_threads()
        images, labels = decode_split_on_cpus(files.tars, files.idxs, count, shards.image_size, workers=threads,
                                              label_paths=files.labels, resize=shards.resize,
                                              fetch=remote_tars(shards, files))
        return images.to(device), labels.to(device)
    loader = build_loader(shards, data_cfg, split, min(256, max(1, count)), rank=0, world=1, device=device,
                          train=False, seed=0)
    size = shards.image_size
    images = torch.empty(count, 3, size, size, dtype=torch.uint8, device=device)
    labels = torch.empty(count, dtype=torch.long, device=device)
    pos = 0
    for x, y in loader.epoch(0):
        images[pos:pos + x.shape[0]] = x
        labels[pos:pos + x.shape[0]] = y
        pos += x.shape[0]
    loader.close()
    assert pos == count, (pos, count)
    return images, labels


def choose_cache(shards: ShardSet, data_cfg, device: torch.device, free_bytes: int | None = None) -> tuple[str, str]:
    """('gpu' | 'ram' | 'none', why) for data.cache. `auto` on CUDA: decode train+val once into
    GPU memory when they fit in `data.cache_budget` of the free GPU memory (`free_bytes`, else
    measured), otherwise stream. `auto` on a CPU streams: there the step, not decoding, bounds
    training, and a RAM cache measured no faster (docs/benchmarks.md)."""
    if data_cfg.cache != "auto":
        if data_cfg.cache == "gpu" and device.type != "cuda":
            raise DataError("data.cache=gpu but training does not run on a CUDA GPU (use data.cache=ram)")
        return data_cfg.cache, f"data.cache={data_cfg.cache}"
    if device.type != "cuda":
        return "none", "no CUDA: streaming (a RAM cache is data.cache=ram)"
    count = shards.count("train") + shards.count("val")
    need = count * 3 * shards.image_size**2  # uint8
    free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
    fits = need <= data_cfg.cache_budget * free
    why = (f"{count} decoded images ({need / 2**30:.2f} GiB) {'fit' if fits else 'do not fit'} in "
           f"{data_cfg.cache_budget:.0%} of {free / 2**30:.1f} GiB free GPU memory")
    return ("gpu", why) if fits else ("none", why + ": streaming")


def build_train_and_val(shards: ShardSet, data_cfg, batch_size: int, *, rank: int, world: int, device: torch.device, seed: int,
                        cache: str = "none", val_limit: int | None = None, val_batch_size: int | None = None):
    """(train loader, val loader): streaming (cache='none'), or decoded once into RAM / GPU.
    `val_limit`: the val loader serves the split's first `val_limit` images only; its batches
    hold `val_batch_size` images (default: batch_size; with accumulation, one micro-batch)."""
    splits = (("train", True, None, batch_size), ("val", False, val_limit, val_batch_size or batch_size))
    if cache == "none":
        return tuple(build_loader(shards, data_cfg, split, size, rank=rank, world=world, device=device, train=train,
                                  seed=seed, limit=limit)
                     for split, train, limit, size in splits)
    target = device if cache == "gpu" else torch.device("cpu")
    order = {"shuffle": train_shuffle(shards, data_cfg)[0], "shuffle_block": data_cfg.shuffle_block,
             "counts": shards.files("train").counts}  # val is read in order: the order is train's
    loaders = []
    for split, train, limit, size in splits:
        images, labels = decode_split(shards, data_cfg, split, target)
        loaders.append(_OnDevice(CachedLoader(images[:limit], labels[:limit], size, rank=rank, world=world,
                                              train=train, seed=seed, flip=data_cfg.flip, **order), device))
    return tuple(loaders)


def adopt_shard_size(model_cfg, shards: ShardSet) -> None:
    """model.image_size follows the shards' image_size unless it is set (check_model_fits_shards
    then says whether the set value agrees)."""
    if model_cfg.image_size is None:
        model_cfg.image_size = shards.image_size


def fit_model_to_shards(model_cfg, shards: ShardSet) -> None:
    adopt_shard_size(model_cfg, shards)
    check_model_fits_shards(model_cfg, shards)


def check_model_fits_shards(model_cfg, shards: ShardSet, weights=None) -> None:
    """A model whose input shape is not the shards' is refused at start, in one line (not with
    a shape error at the first step). `weights`: the model is a trained one's, from that file."""
    size, halvings = shards.image_size, 2 ** len(model_cfg.widths)
    if model_cfg.image_size != size:
        if weights is not None:
            raise DataError(f"the model in {weights} takes {model_cfg.image_size}x{model_cfg.image_size} images but "
                            f"the shards in {shards.root} hold {size}x{size}: use shards packed with --image-size "
                            f"{model_cfg.image_size}")
        raise DataError(f"model.image_size={model_cfg.image_size} but the shards in {shards.root} hold {size}x{size} "
                        f"images: leave model.image_size unset (it follows the shards) or pack with "
                        f"--image-size {model_cfg.image_size}")
    if size % halvings:
        raise DataError(f"the shards in {shards.root} hold {size}x{size} images, which {len(model_cfg.widths)} "
                        f"stride-2 convs (model.widths) cannot halve to a whole size: pack at a multiple of {halvings}")
    if model_cfg.in_channels != 3:
        raise DataError(f"model.in_channels={model_cfg.in_channels} but the shards in {shards.root} hold RGB images: "
                        f"set model.in_channels=3")


def verify_shards(shards: ShardSet) -> str:
    """data.verify=true: `vae-dist verify` before training (sha256 of every shard, every sample
    complete); the first problem is a one-line error. Returns the line that reports success."""
    import time

    if shards.is_remote:  # nothing local to check: each tar's sha256 is checked as it arrives
        return f"data.verify: the shards at {shards.root} are checked as they arrive (each tar's sha256)"
    t0 = time.perf_counter()
    problems = verify(shards.root, shards.manifest)
    if problems:
        n = len(problems)
        raise DataError(f"data.verify: {counted(n, 'problem')} with the shards in {shards.root}, the first: "
                        f"{problems[0]} (`vae-dist verify {shards.root}` lists them all; pack again to fix them)")
    count = sum(len(split.get("shards", [])) for split in shards.manifest.get("splits", {}).values())
    return f"data.verify: all {counted(count, 'shard')} in {shards.root} match manifest.json ({time.perf_counter() - t0:.1f} s)"
