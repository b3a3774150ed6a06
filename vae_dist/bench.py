"""`vae-dist bench data|step|e2e`: throughput in images/second, measured side by side.

Method (every benchmark): warm-up iterations excluded (compile, pipeline start, caches),
the device synchronized before each clock read, the median of `--repeats` timed windows.
Results go to a printed table and, with --json, to the JSON of DESIGN.md:
{"device": ..., "env": {...}, "results": [{"name", "img_per_s", "batch_size", "steps", ...}]}.

- data: each loader over the same shards / images: DALI mixed (GPU), DALI CPU, the
  PyTorch WebDataset loader, and the seed's ImageFolder + PIL + DataLoader.
- step: train steps on synthetic on-device batches: eager vs compiled, fp32 vs bf16,
  channels_last, batch sizes; achieved FLOP/s against the device's peak.
- e2e: the real Trainer.train_step fed from the shards (fraction of time waiting on data),
  next to the seed baseline (ImageFolder loader, eager, fp32, batch 64) in the same run.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vae_dist.errors import UserError
from vae_dist.flops import peak_flops, train_flops_per_image

# -- shared helpers ------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(run_window, repeats: int) -> tuple[float, list[float]]:
    """Median over repeats of images/second; run_window() returns (images, seconds)."""
    rates = []
    for _ in range(repeats):
        images, seconds = run_window()
        rates.append(images / seconds)
    return statistics.median(rates), rates


def environment() -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
           "platform": platform.platform()}
    for mod in ("nvidia.dali", "accelerate", "webdataset", "torchvision"):
        try:
            env[mod.split(".")[-1]] = __import__(mod, fromlist=["__version__"]).__version__
        except ImportError:
            env[mod.split(".")[-1]] = None
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def _sample_shards(tiny: bool) -> tuple[str, str]:
    """(shard folder, extracted root) of the sample set, packed once into a temp folder."""
    from vae_dist.data.pack import PackOptions, pack
    from vae_dist.data.sample import make_sample_dataset

    root = Path(tempfile.mkdtemp(prefix="vae-dist-bench-"))
    per_class = (20, 5) if tiny else (1000, 50)  # 10k images: ~40 batches of 256 per epoch
    src = make_sample_dataset(root / "tiny-sample", per_class[0], per_class[1], test_count=0)
    pack(src, root / "shards", PackOptions(shard_size=100 if tiny else 1000))
    return str(root / "shards"), str(src)


def _model_cfg(tiny: bool):
    from vae_dist.model import VAEConfig

    return VAEConfig(widths=(8, 16, 16, 32), latent_dim=16) if tiny else VAEConfig()


# -- data ------------------------------------------------------------------------------------

def bench_data(args, shards: str, images_root: str | None) -> list[dict]:
    from vae_dist.config import DataConfig
    from vae_dist.data import dali
    from vae_dist.data.loaders import CachedLoader, build_loader, decode_split
    from vae_dist.data.torch_loaders import image_folder_loader

    bs = args.batch_size or (32 if args.tiny else 256)
    threads = args.threads or os.cpu_count() or 1
    steps = args.steps or (4 if args.tiny else 50)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 5)
    results = []
    cpu = torch.device("cpu")
    gpu = torch.device("cuda", 0) if torch.cuda.is_available() else None

    def stream(make):  # an endless batch stream over epochs
        return itertools.chain.from_iterable(make(e) for e in itertools.count())

    configs = [
        ("dali-gpu (mixed decode)", "dali", "gpu", gpu),
        ("dali-cpu", "dali", "cpu", cpu),
        ("webdataset+torchvision (PyTorch)", "webdataset", "cpu", cpu),
    ]
    for name, loader, decode, device in configs:
        if device is None:
            results.append({"name": name, "unavailable": "no CUDA GPU"})
            continue
        if loader == "dali" and not dali.HAVE_DALI:
            results.append({"name": name, "unavailable": "NVIDIA DALI not installed"})
            continue

        def measure(name=name, loader=loader, decode=decode, device=device):
            cfg = DataConfig(shards=shards, loader=loader, decode=decode, num_threads=threads)
            ld = build_loader(cfg, "train", bs, rank=0, world=1, device=device, train=True, seed=0)
            try:
                return _measure_stream(name, stream(ld.epoch), bs, steps, warmup, args.repeats, device,
                                       threads=threads)
            finally:
                ld.close()

        results.append(_row_or_reason(name, measure))
    # the decoded-split cache (data.cache): built once (timed apart), then served from memory
    cache_device = gpu or cpu
    cache_name = f"{'gpu' if gpu is not None else 'ram'}-cache (decoded once, then gather + flip)"

    def measure_cache():
        cfg = DataConfig(shards=shards, num_threads=threads)
        t0 = time.perf_counter()
        images, labels = decode_split(cfg, "train", cache_device)
        _sync(cache_device)
        build_s = time.perf_counter() - t0
        ld = CachedLoader(images, labels, bs)
        return _measure_stream(cache_name, stream(ld.epoch), bs, steps, warmup, args.repeats, cache_device,
                               threads=threads, build_s=build_s, build_img_per_s=images.shape[0] / build_s)

    results.append(_row_or_reason(cache_name, measure_cache))
    if images_root and Path(images_root, "train").is_dir():
        def measure_seed(name="seed: ImageFolder+PIL DataLoader"):
            dl = image_folder_loader(str(Path(images_root) / "train"), bs, threads)
            return _measure_stream(name, stream(lambda e: iter(dl)), bs, steps, warmup, args.repeats, cpu,
                                   threads=threads)

        results.append(_row_or_reason("seed: ImageFolder+PIL DataLoader", measure_seed))
    else:
        results.append({"name": "seed: ImageFolder+PIL DataLoader", "unavailable": "pass --images (extracted root)"})
    return results


def _memory(device: torch.device) -> dict:
    """Host RSS of this process and its children (DataLoader workers), and GPU memory in use."""
    def rss(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
        except (OSError, StopIteration):
            return 0.0

    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                children.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    out = {"rss_mib": rss(os.getpid()) + sum(rss(c) for c in children)}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        out["gpu_mem_mib"] = (total - free) / 2**20
    return out


def _measure_stream(name, it, bs, steps, warmup, repeats, device, **extra) -> dict:
    for _ in range(warmup):
        next(it)

    def window():
        _sync(device)
        t0 = time.perf_counter()
        n = 0
        for _ in range(steps):
            x = next(it)[0]
            n += x.shape[0]
        _sync(device)
        return n, time.perf_counter() - t0

    median, rates = _timed(window, repeats)
    return {"name": name, "img_per_s": median, "batch_size": bs, "steps": steps, "repeats": rates,
            **_memory(device), **extra}


# -- step ------------------------------------------------------------------------------------

def _seed_step_fn(model, optimizer, device):
    """The seed coursework's step: eager, fp32, loss.backward(), optimizer.step()."""
    from vae_dist.losses import kl_divergence, recon_loss

    def step(x):
        x_hat, mu, logvar = model(x.to(device))
        loss = recon_loss(x_hat, x.to(device)) + kl_divergence(mu, logvar)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def _accelerator(dtype: str):
    """A fresh single-process Accelerator with this autocast precision, under the CUDA math
    settings training uses (TF32, cuDNN autotuning)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from vae_dist.train import configure_cuda_math

    AcceleratorState._reset_state(reset_partial_state=True)
    configure_cuda_math()
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=PRECISIONS[dtype])


def _fresh_compile() -> None:
    """Forgets every compiled graph and dynamo's counters (reset() keeps the counters)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def _compiled_graphs() -> tuple[int, int]:
    """(graphs compiled, graph breaks) since the last _fresh_compile()."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def bench_step(args) -> list[dict]:
    """The real training step (step.py: sync-free skip, lr/beta tensors, fused Adam) on a
    synthetic on-device batch: its ceiling, without data loading."""
    from vae_dist.config import LossConfig
    from vae_dist.model import VAE
    from vae_dist.step import TrainStep

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    on_gpu = device.type == "cuda"
    cfg = _model_cfg(args.tiny)
    default_batches = "8" if args.tiny else "64,256,1024,4096" if on_gpu else "64"
    batch_sizes = [int(b) for b in (args.batch_sizes or default_batches).split(",")]
    dtypes = (args.dtypes or ("fp32,bf16" if on_gpu else "fp32")).split(",")
    unknown = [d for d in dtypes if d not in PRECISIONS]
    if unknown:
        raise UserError(f"unknown --dtypes {','.join(unknown)} (choose from {', '.join(PRECISIONS)})")
    compiles = {"both": [False, True], "on": [True], "off": [False]}[args.compile]
    layouts = {"both": [False, True], "on": [True], "off": [False]}[args.channels_last]
    steps = args.steps or (3 if args.tiny else 30 if on_gpu else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 10 if on_gpu else 3)
    flops = train_flops_per_image(cfg)
    results = []
    for bs, dtype, compiled, cl in itertools.product(batch_sizes, dtypes, compiles, layouts):
        mode = f"compiled[{args.compile_mode}]" if compiled and args.compile_mode != "default" else "compiled"
        name = f"{mode if compiled else 'eager'} {dtype}{' channels_last' if cl else ''} b{bs}"

        def measure(bs=bs, dtype=dtype, compiled=compiled, cl=cl, name=name):
            # Each row compiles afresh: without a reset, the next batch size would recompile the
            # same code as a dynamic-shape graph, and past dynamo's recompile limit (8) later
            # "compiled" rows would silently run eager. The row records what really ran.
            _fresh_compile()
            acc = _accelerator(dtype)
            torch.manual_seed(0)
            model = VAE(cfg).to(device, memory_format=torch.channels_last if cl else torch.preserve_format)
            model, opt = acc.prepare(model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True))
            step = TrainStep(acc, model, opt, LossConfig(), grad_clip=0.0,
                             compile_mode=args.compile_mode if compiled else None, channels_last=cl)
            x = torch.rand(bs, 3, cfg.image_size, cfg.image_size, device=device)
            t_warm = time.perf_counter()
            for _ in range(warmup):
                step(x, 1e-3, 1.0)
            _sync(device)
            warmup_s = time.perf_counter() - t_warm  # compile time, for compiled rows
            graphs, breaks = _compiled_graphs()

            def window():
                _sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    step(x, 1e-3, 1.0)
                _sync(device)
                return bs * steps, time.perf_counter() - t0

            median, rates = _timed(window, args.repeats)
            new_graphs = _compiled_graphs()[0] - graphs  # > 0: a recompile inside the timed windows
            row = {"name": name, "img_per_s": median, "batch_size": bs, "steps": steps, "repeats": rates,
                   "compile": compiled, "dtype": dtype, "autocast": str(step.autocast_dtype or "off"),
                   "channels_last": cl, "steps_per_s": median / bs, "warmup_s": warmup_s,
                   "compiled_graphs": graphs, "graph_breaks": breaks, "recompiles_while_timed": new_graphs,
                   "gflop_per_image": flops / 1e9, "tflop_per_s": median * flops / 1e12}
            if compiled and graphs == 0:
                row["note"] = "compile produced no graph: this row ran eager"
            peak = peak_flops(device, PRECISIONS[dtype])
            if peak:
                row["mfu"] = median * flops / peak
            if args.profile:
                from vae_dist.profiling import profile_steps

                slug = name.replace(" ", "_").replace("[", "-").replace("]", "")
                row["profile"] = profile_steps(lambda: step(x, 1e-3, 1.0), min(steps, 10), device, Path(args.profile),
                                               slug)
            return row

        results.append(_row_or_reason(name, measure))
    return results


def _row_or_reason(name: str, measure) -> dict:
    """One benchmark row; a configuration that cannot be measured says why in its row, and
    the other rows are still measured."""
    try:
        return measure()
    except UserError as e:
        return {"name": name, "unavailable": str(e)}
    except Exception as e:  # noqa: BLE001 - a failing configuration is a result, not a crash
        # DataLoader workers wrap the cause in a traceback: its last line names it
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        return {"name": name, "unavailable": f"failed: {lines[-1] if lines else type(e).__name__}"}


# -- e2e -------------------------------------------------------------------------------------

def bench_e2e(args, shards: str, images_root: str | None) -> list[dict]:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    on_gpu = device.type == "cuda"
    bs = args.batch_size or (16 if args.tiny else 64)
    steps = args.steps or (4 if args.tiny else 60 if on_gpu else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 20 if on_gpu else 5)
    variants = (args.variants or ("seed,fast,cache" if on_gpu else "seed,fast")).split(",")
    results = []
    for variant in variants:
        if variant == "seed":
            if not (images_root and Path(images_root, "train").is_dir()):
                results.append({"name": "seed", "unavailable": "pass --images (extracted root)"})
                continue
            results.append(_row_or_reason("seed", lambda: _e2e_seed(args, images_root, bs, steps, warmup, device)))
        elif variant in ("fast", "cache"):
            if variant == "cache" and not on_gpu:
                results.append({"name": "fast+gpu-cache", "unavailable": "no CUDA GPU"})
                continue
            results.append(_row_or_reason(variant, lambda v=variant: _e2e_trainer(args, shards, v, bs, steps, warmup,
                                                                                  device)))
        else:
            raise UserError(f"unknown e2e variant '{variant}' (choose from seed, fast, cache)")
    return results


def _e2e_seed(args, images_root, bs, steps, warmup, device) -> dict:
    """The seed coursework's loop: ImageFolder loader, eager fp32 model, Adam."""
    from vae_dist.data.torch_loaders import image_folder_loader
    from vae_dist.model import VAE

    threads = args.threads or os.cpu_count() or 1
    dl = image_folder_loader(str(Path(images_root) / "train"), bs, threads)
    torch.manual_seed(0)
    model = VAE(_model_cfg(args.tiny)).to(device)
    step = _seed_step_fn(model, torch.optim.Adam(model.parameters(), lr=1e-3), device)
    it = itertools.chain.from_iterable(iter(dl) for _ in itertools.count())
    return _measure_training("seed: ImageFolder, eager fp32", it, step, bs, steps, warmup, args.repeats, device)


def _e2e_trainer(args, shards, variant, bs, steps, warmup, device) -> dict:
    """The real Trainer (Accelerate, DALI, compile, channels_last, bf16 on GPU)."""
    from accelerate.state import AcceleratorState

    from vae_dist.config import build_config
    from vae_dist.train import Trainer

    AcceleratorState._reset_state(reset_partial_state=True)  # one Accelerator per variant
    out = tempfile.mkdtemp(prefix="vae-dist-bench-run-")
    threads = args.threads or os.cpu_count() or 1
    arch = [] if not args.tiny else ["--model.widths=[8,16,16,32]", "--model.latent_dim=16"]
    cfg = build_config(overrides=[
        f"--data.shards={shards}", f"--train.out_dir={out}", f"--train.batch_size={bs}",
        f"--data.num_threads={threads}", "--log.wandb_mode=disabled", "--model.compile=true",
        f"--model.compile_mode={args.compile_mode}", "--model.channels_last=true",
        f"--data.cache={'gpu' if variant == 'cache' else 'none'}", *arch,
    ])
    trainer = Trainer(cfg)
    loader = trainer.train_loader
    it = itertools.chain.from_iterable(loader.epoch(e) for e in itertools.count())
    info = trainer.describe()  # what really runs: the loader DALI or its fallback, the precision
    precision = info["mixed_precision"] if info["mixed_precision"] != "no" else "fp32"
    name = f"{'fast+gpu-cache' if variant == 'cache' else 'fast'}: {info['loader']}, compiled, channels_last, {precision}"
    try:
        return _measure_training(name, it, trainer.train_step, bs, steps, warmup, args.repeats, device,
                                 loader=info["loader"], precision=precision, data=info["data"])
    finally:
        trainer.close_loaders()


def _measure_training(name, it, train_step, bs, steps, warmup, repeats, device, **extra) -> dict:
    for _ in range(warmup):
        train_step(next(it)[0])
    waits = []

    def window():
        _sync(device)
        t0 = time.perf_counter()
        wait = 0.0
        for _ in range(steps):
            tw = time.perf_counter()
            x = next(it)[0]
            wait += time.perf_counter() - tw
            train_step(x)
        _sync(device)
        seconds = time.perf_counter() - t0
        waits.append(wait / seconds)
        return bs * steps, seconds

    median, rates = _timed(window, repeats)
    return {"name": name, "img_per_s": median, "batch_size": bs, "steps": steps, "repeats": rates,
            "data_wait": statistics.median(waits), **extra}


# -- entry point -----------------------------------------------------------------------------

def print_table(what: str, results: list[dict]) -> None:
    print(f"\nvae-dist bench {what} on {device_name()}")
    print(f"{'configuration':<48} {'img/s':>12} {'batch':>6} {'steps':>6}  notes")
    for r in results:
        if "unavailable" in r:
            why = r["unavailable"] if r["unavailable"].startswith("failed") else f"unavailable: {r['unavailable']}"
            print(f"{r['name']:<48} {'-':>12} {'':>6} {'':>6}  {why}")
            continue
        notes = []
        if "data_wait" in r:
            notes.append(f"data wait {r['data_wait']:.0%}")
        if "build_s" in r:
            notes.append(f"built in {r['build_s']:.1f} s")
        if "rss_mib" in r:
            notes.append(f"RSS {r['rss_mib']:,.0f} MiB" + (f", GPU {r['gpu_mem_mib']:,.0f} MiB" if "gpu_mem_mib" in r else ""))
        if "tflop_per_s" in r:
            notes.append(f"{r['tflop_per_s']:.2f} TFLOP/s")
        if "mfu" in r:
            notes.append(f"{r['mfu']:.1%} of peak")
        if r.get("compile"):
            notes.append(f"{r['compiled_graphs']} graphs in {r['warmup_s']:.0f} s")
        if "note" in r:
            notes.append(r["note"])
        if "profile" in r:
            notes.append(f"bound by {r['profile']['bound_by']}")
        print(f"{r['name']:<48} {r['img_per_s']:>12,.1f} {r['batch_size']:>6} {r['steps']:>6}  {', '.join(notes)}")


def plot(results: list[dict], title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "img_per_s" in r]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2), dpi=110)
    ax.barh([r["name"] for r in rows][::-1], [r["img_per_s"] for r in rows][::-1], color="#4c72b0")
    for i, r in enumerate(rows[::-1]):
        ax.text(r["img_per_s"], i, f" {r['img_per_s']:,.0f}", va="center", fontsize=8)
    ax.set_xlabel("images / second (median)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run_bench(args) -> int:
    shards, images_root = args.shards, args.images
    if args.what in ("data", "e2e") and shards is None:
        shards, made_root = _sample_shards(args.tiny)
        images_root = images_root or made_root
    if args.what == "data":
        results = bench_data(args, shards, images_root)
    elif args.what == "step":
        results = bench_step(args)
    else:
        results = bench_e2e(args, shards, images_root)
    report = {"device": device_name(), "env": environment(), "benchmark": args.what, "shards": shards,
              "results": results}
    print_table(args.what, results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"results: {args.json}")
    if args.plot:
        plot(results, f"vae-dist bench {args.what} — {device_name()}", args.plot)
        print(f"plot: {args.plot}")
    return 0
