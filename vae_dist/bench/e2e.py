"""`vae-dist bench e2e`: the real Trainer.train_step fed from the shards (the fraction of
time waiting on data), next to the seed's own loop (ImageFolder loader, eager, fp32, batch
64) in the same run, and the GPU cache where there is a GPU. With --shards URL (bench/remote.py):
the `fast` variant twice, from the set's local copy and streaming from the URL through a cold
shard cache below the set's size; the other variants read the local copy.
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vae_dist.bench.common import model_cfg, row_or_reason, sync, timed
from vae_dist.bench.remote import link_fields, needed
from vae_dist.errors import UserError
from vae_dist.metrics import Stopwatch

VARIANTS = ("seed", "fast", "cache", "graph")


def bench_e2e(args, shards: str, images_root: str | None, on_row=None, remote=None) -> list[dict]:
    """Rows for each batch size (--batch-sizes, else --batch-size), each variant in the order
    given: seed (the coursework's loop), fast (the Trainer streaming from the shards), cache
    (the Trainer on the decoded split in GPU memory, RAM on a CPU), graph (cache + the whole
    step as one CUDA graph). `on_row(results)` follows every row. `remote`: a
    bench.remote.RemoteBench where --shards is a URL (`shards` is then its local copy)."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    on_gpu = device.type == "cuda"
    preset = _preset_batch(args.config) if getattr(args, "config", None) else None  # a config file's batch
    sizes = [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [args.batch_size or preset or
                                                                                     (16 if args.tiny else 64)]
    steps = args.steps or (4 if args.tiny else 60 if on_gpu else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 20 if on_gpu else 5)
    variants = (args.variants or ("seed,fast,cache" if on_gpu else "seed,fast")).split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise UserError(f"unknown e2e variant '{unknown[0]}' (choose from {', '.join(VARIANTS)})")
    results = [remote.fetch_row] if remote else []
    for bs in sizes:
        for variant in variants:
            if variant == "fast" and remote is not None:  # from the local copy, then streaming from the URL
                for link in (None, remote):
                    results.append(row_or_reason("fast", lambda bs=bs, link=link: _e2e_trainer(
                        args, shards, "fast", bs, steps, warmup, device, remote=remote, link=link)))
                    if on_row:
                        on_row(results)
                continue
            if variant == "seed":
                if not (images_root and Path(images_root, "train").is_dir()):
                    results.append({"name": "seed", "unavailable": "pass --images (extracted root)"})
                else:
                    results.append(row_or_reason("seed", lambda bs=bs: _e2e_seed(args, images_root, bs, steps, warmup,
                                                                                 device)))
            else:
                results.append(row_or_reason(variant, lambda v=variant, bs=bs: _e2e_trainer(args, shards, v, bs, steps,
                                                                                            warmup, device)))
            if on_row:
                on_row(results)
    if remote is not None:  # the MB/s a link must carry to feed each row at its speed
        results = [needed(r, remote.bytes_per_image) for r in results]
    return results


def _preset_batch(config: str) -> int | None:
    from vae_dist.config import build_config

    return build_config(config).train.batch_size


def _e2e_seed(args, images_root, bs, steps, warmup, device) -> dict:
    """The seed coursework's loop: ImageFolder loader, eager fp32 model, Adam."""
    from vae_dist.data.torch_loaders import image_folder_loader
    from vae_dist.model import VAE

    threads = args.threads or os.cpu_count() or 1
    dl = image_folder_loader(str(Path(images_root) / "train"), bs, threads)
    torch.manual_seed(0)
    model = VAE(model_cfg(args.tiny)).to(device)
    step = _seed_step_fn(model, torch.optim.Adam(model.parameters(), lr=1e-3), device)
    it = itertools.chain.from_iterable(iter(dl) for _ in itertools.count())
    return _measure_training("seed: ImageFolder, eager fp32", it, step, bs, steps, warmup, args.repeats, device)


def _e2e_trainer(args, shards, variant, bs, steps, warmup, device, remote=None, link=None) -> dict:
    """The real Trainer (Accelerate, DALI, compile, channels_last, bf16 on GPU). Beside a URL
    (`remote`), in data.shuffle=shards order; `link` (the remote): streaming from the URL through
    a cold shard cache below the set's size, else from the local copy `shards`."""
    from accelerate.state import AcceleratorState

    from vae_dist.config import build_config
    from vae_dist.train import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per variant
    torch._dynamo.reset()  # each row compiles afresh (no dynamic-shape recompile of the last row's graphs)
    out = tempfile.mkdtemp(prefix="vae-dist-bench-run-")
    cache = "gpu" if device.type == "cuda" else "ram"
    threads = args.threads or os.cpu_count() or 1
    arch = [] if not args.tiny else ["--model.widths=[8,16,16,32]", "--model.latent_dim=16"]
    config = getattr(args, "config", None)
    cfg = build_config(config, overrides=[
        f"--data.shards={shards}", f"--train.out_dir={out}", f"--train.batch_size={bs}",
        f"--data.num_threads={threads}", "--log.wandb_mode=disabled", "--model.compile=true",
        f"--model.compile_mode={args.compile_mode}", "--model.channels_last=true",
        f"--data.cache={cache if variant != 'fast' else 'none'}", f"--train.cuda_graph={str(variant == 'graph').lower()}", *arch,
        *(_beside_url(remote, link, threads, config) if remote is not None else []),
    ])
    trainer = Trainer(cfg)
    loader = trainer.train_loader
    it = itertools.chain.from_iterable(loader.epoch(e) for e in itertools.count())
    info = trainer.describe()  # what really runs: the loader DALI or its fallback, the precision
    precision = info["mixed_precision"] if info["mixed_precision"] != "no" else "fp32"
    kind = {"fast": "fast", "cache": f"fast+{cache}-cache", "graph": f"graph+{cache}-cache"}[variant]
    step = "compiled, whole-step CUDA graph" if variant == "graph" else "compiled"
    name = f"{kind}: {info['loader']}, {step}, channels_last, {precision}" + (f" [{Path(config).name}]" if config else "")
    where = {}
    if remote is not None:
        name += ": URL, streaming" if link is not None else ": local copy"
        where = {"shuffle": cfg.data.shuffle, **({"shard_cache_gb": cfg.data.shard_cache_gb} if link is not None else
                                                 link_fields(None, None))}
    try:
        return _measure_training(name, it, trainer.train_step, bs, steps, warmup, args.repeats, device,
                                 link=loader.fetch_stats if link is not None else None,
                                 loader=info["loader"], precision=precision, data=info["data"], **where)
    finally:
        trainer.close_loaders()
        shutil.rmtree(out, ignore_errors=True)


def _beside_url(remote, link, threads: int, config: str | None) -> list[str]:
    """The overrides of a Trainer row beside a URL: the URL's order on both rows; on the streaming
    row, the URL through a cold shard cache below the set's size, `--prefetch` shards ahead."""
    from vae_dist.config import build_config

    if link is None:
        return ["--data.shuffle=shards"]
    block = build_config(config).data.shuffle_block  # the --config file's
    return ["--data.shuffle=shards", *(f"--data.{key}={value}" for key, value in link.stream_settings(threads, block).items())]


def _measure_training(name, it, train_step, bs, steps, warmup, repeats, device, link=None, **extra) -> dict:
    """`link`: the loader's fetch_stats where it streams from a URL: the row carries the link's columns."""
    for _ in range(warmup):
        train_step(next(it)[0])
    before = link() if link else None
    waits = []

    def window():
        sync(device)
        t0, data_wait = time.perf_counter(), Stopwatch()
        for _ in range(steps):
            with data_wait:
                x = next(it)[0]
            train_step(x)
        sync(device)
        seconds = time.perf_counter() - t0
        waits.append(data_wait.seconds / seconds)
        return bs * steps, seconds

    median, rates = timed(window, repeats)
    after = link() if link else None
    return {"name": name, "img_per_s": median, "batch_size": bs, "steps": steps, "repeats": rates,
            "data_wait": statistics.median(waits), **extra, **(link_fields(before, after) if after else {})}


def _seed_step_fn(model, optimizer, device):
    """The seed coursework's step: eager, fp32, loss.backward(), optimizer.step()."""
    from vae_dist.losses import kl_divergence, recon_loss

    def step(x):
        x = x.to(device)  # one copy per batch, as a plain training loop makes
        x_hat, mu, logvar = model(x)
        loss = recon_loss(x_hat, x) + kl_divergence(mu, logvar)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step
