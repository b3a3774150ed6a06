"""`vae-dist bench step`: the real training step on synthetic on-device batches, its ceiling
without data loading: eager vs compiled, fp32 vs bf16, channels_last, batch sizes; the
achieved FLOP/s against the device's peak, and what bounds a step (with --profile).
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import torch

from vae_dist.bench import CPU_BATCH_SIZES, GPU_BATCH_SIZES
from vae_dist.bench.common import model_cfg, row_or_reason, sync, timed
from vae_dist.data.pack import check_image_size
from vae_dist.errors import UserError
from vae_dist.flops import peak_flops, train_flops_per_image

PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def _accelerator(dtype: str):
    """A fresh single-process Accelerator with this autocast precision, under the CUDA math
    settings training uses (TF32, cuDNN autotuning)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from vae_dist.distributed import configure_cuda_math

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


def bench_step(args, on_row=None) -> list[dict]:
    """The real training step (step.py: sync-free skip, lr/beta tensors, fused Adam) on a
    synthetic on-device batch: its ceiling, without data loading. `on_row(results)` follows
    every row (the JSON rewritten, so a run cut short keeps what it measured)."""
    from vae_dist.config import LossConfig
    from vae_dist.model import VAE
    from vae_dist.step import GraphedStep, TrainStep, check_cuda_graph

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    on_gpu = device.type == "cuda"
    check_image_size(args.image_size)
    cfg = model_cfg(args.tiny, args.image_size)
    default_batches = "8" if args.tiny else GPU_BATCH_SIZES if on_gpu else CPU_BATCH_SIZES
    batch_sizes = [int(b) for b in (args.batch_sizes or default_batches).split(",")]
    dtypes = (args.dtypes or ("fp32,bf16" if on_gpu else "fp32")).split(",")
    unknown = [d for d in dtypes if d not in PRECISIONS]
    if unknown:
        raise UserError(f"unknown --dtypes {','.join(unknown)} (choose from {', '.join(PRECISIONS)})")
    steps = args.steps or (3 if args.tiny else 30 if on_gpu else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 10 if on_gpu else 3)
    flops = train_flops_per_image(cfg)
    results = []
    for bs, dtype, mode, cl in row_specs(args, batch_sizes, dtypes):
        compiled = mode != "eager"
        compile_mode = "default" if mode == "graph" else mode
        label = {"eager": "eager", "default": "compiled", "graph": "graph[whole step, compiled]"}.get(mode,
                                                                                                 f"compiled[{mode}]")
        name = f"{label} {dtype}{' channels_last' if cl else ''} b{bs}"

        def measure(bs=bs, dtype=dtype, compiled=compiled, compile_mode=compile_mode, graph=mode == "graph", cl=cl,
                    name=name):
            # Each row compiles afresh: without a reset, the next batch size would recompile the
            # same code as a dynamic-shape graph, and past dynamo's recompile limit (8) later
            # "compiled" rows would silently run eager. The row records what really ran.
            _fresh_compile()
            acc = _accelerator(dtype)
            torch.manual_seed(0)
            model = VAE(cfg).to(device, memory_format=torch.channels_last if cl else torch.preserve_format)
            model, opt = acc.prepare(model, torch.optim.Adam(model.parameters(), lr=1e-3, fused=True))
            step = TrainStep(acc, model, opt, LossConfig(), grad_clip=0.0,
                             compile_mode=compile_mode if compiled else None, channels_last=cl)
            if graph:
                check_cuda_graph(True, device, 1, 1, PRECISIONS[dtype], compile_mode)
                step = GraphedStep(step)
            x = torch.rand(bs, 3, cfg.image_size, cfg.image_size, device=device)
            t_warm = time.perf_counter()
            for _ in range(warmup):
                step(x, 1e-3, 1.0)
            sync(device)
            warmup_s = time.perf_counter() - t_warm  # compile time, for compiled rows
            graphs, breaks = _compiled_graphs()

            def window():
                sync(device)
                t0 = time.perf_counter()
                for _ in range(steps):
                    step(x, 1e-3, 1.0)
                sync(device)
                return bs * steps, time.perf_counter() - t0

            median, rates = timed(window, args.repeats)
            new_graphs = _compiled_graphs()[0] - graphs  # > 0: a recompile inside the timed windows
            row = {"name": name, "img_per_s": median, "batch_size": bs, "image_size": cfg.image_size, "steps": steps,
                   "repeats": rates,
                   "compile": compiled, "compile_mode": compile_mode if compiled else None, "cuda_graph": graph,
                   "dtype": dtype, "autocast": str(step.autocast_dtype or "off"),
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

        results.append(row_or_reason(name, measure))
        if on_row:
            on_row(results)
    return results


MODES = ("eager", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "graph")


def row_specs(args, batch_sizes: list[int], dtypes: list[str]) -> list[tuple[int, str, str, bool]]:
    """(batch, dtype, mode, channels_last) of each row, in the order measured: --rows as given
    (MODE:DTYPE:BATCH; mode graph = compiled default + the whole step as one CUDA graph), else
    every combination of --batch-sizes, --dtypes, --compile (with --compile-mode), --channels-last."""
    layouts = {"both": [False, True], "on": [True], "off": [False]}[args.channels_last]
    if getattr(args, "rows", None):
        specs = []
        for spec in args.rows.split(","):
            parts = spec.split(":")
            if len(parts) != 3 or parts[0] not in MODES or parts[1] not in PRECISIONS or not parts[2].isdigit():
                raise UserError(f"--rows: {spec!r} is not MODE:DTYPE:BATCH (modes: {', '.join(MODES)}; "
                                f"dtypes: {', '.join(PRECISIONS)})")
            specs += [(int(parts[2]), parts[1], parts[0], cl) for cl in layouts]
        return specs
    compiles = {"both": ["eager", args.compile_mode], "on": [args.compile_mode], "off": ["eager"]}[args.compile]
    return list(itertools.product(batch_sizes, dtypes, compiles, layouts))
