"""`vae-dist bench comm`: what DDP's gradient all-reduce costs a training step, with N processes.

For each process count in --world, `accelerate launch` starts N workers (this module run as
`python -m vae_dist.bench.comm`; gloo on the CPU, NCCL with N GPUs) and rank 0 writes:
- the all-reduce alone, from 256 KiB to 64 MiB: time, algorithm and bus bandwidth (NCCL's
  definition: busbw = bytes / time x 2(N-1)/N), and a latency-bandwidth fit t = a + S / bw;
- the real training step (step.py, the seed VAE) under each DDP knob, split into compute (the
  same step with every all-reduce skipped: DDP's no_sync), the exposed all-reduce (step minus
  compute), and the all-reduce of the step's gradient buckets alone; `overlap` is the share of
  that all-reduce hidden behind the backward pass: 1 - exposed / alone.
On a CPU, compute and gloo share the same cores: the numbers calibrate docs/scaling.md's model
(its bucket-order overlap, its latency-bandwidth form); they are not GPU numbers.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from vae_dist.errors import UserError

# (name, train.* overrides): the knobs of docs/scaling.md, each against the default
KNOBS = [
    ("fp32 grads (default)", {}),
    ("bf16 grads", {"ddp_comm_hook": "bf16"}),
    ("fp16 grads", {"ddp_comm_hook": "fp16"}),
    ("powersgd rank 1", {"ddp_comm_hook": "powersgd", "powersgd_start": 2}),
    ("bucket 1 MiB", {"ddp_bucket_mb": 1}),
    ("bucket 100 MiB", {"ddp_bucket_mb": 100}),
    ("bucket view", {"ddp_bucket_view": True}),
    ("static graph", {"ddp_static_graph": True}),
    ("accum 2", {"grad_accum_steps": 2}),
    ("accum 4", {"grad_accum_steps": 4}),
]
TINY_KNOBS = ("fp32 grads (default)", "bf16 grads", "accum 2")
SIZES_MIB = (0.25, 1, 4, 16, 64)


def bench_comm(args) -> tuple[list[dict], dict]:
    """One `accelerate launch` per process count: the step rows (the results), and the
    all-reduce sweeps with their fits by process count."""
    from vae_dist.distributed import free_port

    worlds = _worlds(args.world or "2,4")
    gpus = torch.cuda.device_count()
    results, sweeps = [], {}
    t0 = time.time()
    for world in worlds:
        if gpus and world > gpus:
            results.append({"name": f"world {world}", "unavailable": f"{world} processes need {world} GPUs, "
                            f"this machine has {gpus}"})
            continue
        _progress(t0, f"world {world}: starting {world} processes (accelerate launch)")
        with tempfile.TemporaryDirectory(prefix="vae-dist-comm-") as tmp:
            out = Path(tmp) / "rows.json"
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(world),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", str(free_port()), "-m", "vae_dist.bench.comm", str(out),
                   json.dumps({"tiny": args.tiny, "batch_size": args.batch_size, "steps": args.steps,
                               "warmup": args.warmup, "repeats": args.repeats, "t0": t0})]
            # each worker gets its share of the cores (gloo's threads come on top)
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads or max(1, (os.cpu_count() or 1) // world))}
            code, stderr = _launch(cmd, env)
            if code != 0 or not out.is_file():
                results.append({"name": f"world {world}", "unavailable": f"failed: {_cause(stderr, code)}"})
                _progress(t0, f"world {world}: failed")
                continue
            measured = json.loads(out.read_text())
        results.extend(measured["steps"])
        sweeps[str(world)] = {"backend": measured["backend"], "sizes": measured["allreduce"], "fit": measured["fit"]}
        _progress(t0, f"world {world}: done")
        _print_sweep(world, sweeps[str(world)])
    return results, {"allreduce": sweeps}


PROGRESS = "bench comm: "  # the workers' progress lines start so; the launcher passes them on


def _progress(t0: float, text: str) -> None:
    """One progress line, with the time since the benchmark began: a sweep over worlds and knobs
    runs for minutes, and says where it is as it goes."""
    print(f"{PROGRESS}[{time.time() - t0:5.0f} s] {text}", flush=True)


def _launch(cmd: list[str], env: dict) -> tuple[int, str]:
    """Runs the launcher; rank 0's progress lines pass through as they come, the rest of its
    output is kept for a failure's cause. (exit code, stderr)."""
    import threading

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)  # never a full pipe
    reader.start()
    for line in proc.stdout:
        if line.startswith(PROGRESS):
            print(line, end="", flush=True)
    code = proc.wait()
    reader.join()
    return code, "".join(err)


def _worlds(text: str) -> list[int]:
    """--world's process counts: DDP (and so this benchmark) needs 2 or more."""
    try:
        worlds = [int(w) for w in text.split(",")]
    except ValueError:
        worlds = []
    if not worlds or min(worlds) < 2:
        raise UserError(f"bench comm --world must be a comma list of process counts of 2 or more, got {text!r}")
    return worlds


def _cause(stderr: str, code: int) -> str:
    """A failed launch's cause: a worker's last exception line (the launcher's own report,
    printed after it, says only which rank failed)."""
    errors = [line for line in stderr.splitlines() if "Error:" in line and "ChildFailedError" not in line]
    return errors[-1].strip() if errors else f"exit code {code}"


def _print_sweep(world: int, sweep: dict) -> None:
    print(f"\nall-reduce alone, {world} processes ({sweep['backend']}): "
          f"t = {sweep['fit']['latency_ms']:.3f} ms + S / {sweep['fit']['algbw_gb_s']:.2f} GB/s")
    for r in sweep["sizes"]:
        print(f"  {r['mib']:>6g} MiB  {r['ms']:>9.3f} ms  algbw {r['algbw_gb_s']:6.2f} GB/s  busbw {r['busbw_gb_s']:6.2f} GB/s")


# -- the worker: one process of N ----------------------------------------------------------------
def _worker(out: str, options: dict) -> None:
    import torch.distributed as dist
    from accelerate import Accelerator

    from vae_dist.bench.common import row_or_reason
    from vae_dist.distributed import configure_cuda_math

    configure_cuda_math()
    acc = Accelerator(cpu=not torch.cuda.is_available())  # forms the process group (gloo or NCCL)
    world, backend = acc.num_processes, dist.get_backend()
    t0 = options.get("t0", time.time())

    def progress(text: str) -> None:  # rank 0 speaks for all
        if acc.is_main_process:
            _progress(t0, f"world {world}: {text}")

    sizes = SIZES_MIB[:2] if options["tiny"] else SIZES_MIB
    progress(f"all-reduce alone, {sizes[0]:g} to {sizes[-1]:g} MiB ({backend}) ...")
    sweep = _allreduce_sweep(acc, options, sizes)
    fit = _fit(sweep)
    progress("all-reduce alone: done")
    rows, compute = [], {}
    chosen = options.get("only") or (TINY_KNOBS if options["tiny"] else [name for name, _ in KNOBS])
    knobs = [k for k in KNOBS if k[0] in chosen]
    for i, (name, overrides) in enumerate(knobs, 1):
        label = f"world {world}: {name}"
        progress(f"step {i}/{len(knobs)}, {name} ...")
        # every rank measures the same rows and refuses the same ones
        row = row_or_reason(label, lambda name=name, overrides=overrides: _step_row(name, overrides, options, fit, compute))
        rows.append(dict(row, name=label, world=world, backend=backend))
        progress(f"step {i}/{len(knobs)}, {name}: " + (f"{row['step_ms']:.0f} ms a step" if "step_ms" in row
                                                        else row.get("unavailable", "")))
    if acc.is_main_process:
        Path(out).write_text(json.dumps({"backend": backend, "allreduce": sweep, "fit": fit, "steps": rows}))
    acc.wait_for_everyone()
    acc.end_training()


def _timed_ms(run, warmup: int, repeats: int, device) -> tuple[float, list[float]]:
    """Median milliseconds of run() over repeats, every rank starting together."""
    import torch.distributed as dist

    from vae_dist.bench.common import sync

    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        sync(device)
        dist.barrier()
        t0 = time.perf_counter()
        run()
        sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return statistics.median(times), times


def _allreduce_sweep(acc, options, sizes) -> list[dict]:
    import torch.distributed as dist

    n = acc.num_processes
    repeats = 3 if options["tiny"] else max(options["repeats"], 10)
    rows = []
    for mib in sizes:
        x = torch.ones(int(mib * 2**20) // 4, device=acc.device)
        ms, times = _timed_ms(lambda x=x: dist.all_reduce(x), 2, repeats, acc.device)
        algbw = x.numel() * 4 / (ms / 1e3) / 1e9
        rows.append({"name": f"all-reduce {mib:g} MiB fp32", "kind": "allreduce", "mib": mib, "ms": ms,
                     "repeats_ms": times, "algbw_gb_s": algbw, "busbw_gb_s": algbw * 2 * (n - 1) / n})
    return rows


def _fit(rows: list[dict]) -> dict:
    """t = latency + bytes / bandwidth, least squares over the sweep (bandwidth as algbw)."""
    xs = [r["mib"] * 2**20 for r in rows]
    ys = [r["ms"] / 1e3 for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return {"latency_ms": max(0.0, my - slope * mx) * 1e3, "algbw_gb_s": 1 / slope / 1e9 if slope > 0 else float("inf")}


def _step_row(name: str, overrides: dict, options: dict, fit: dict, compute: dict) -> dict:
    """The real step under one DDP setting: step, compute alone, bucket all-reduce alone.
    `compute`: compute_ms by accumulation steps, measured once per count (static_graph has no
    no_sync to measure its own with; its compute is the default step's)."""
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from vae_dist.bench.common import model_cfg
    from vae_dist.config import LossConfig, TrainConfig
    from vae_dist.distributed import WIRE_DTYPES, check_comm_hook, ddp_kwargs
    from vae_dist.model import VAE
    from vae_dist.step import TrainStep

    train = TrainConfig(**overrides)
    check_comm_hook(AcceleratorState(), train.ddp_comm_hook)  # what training refuses, this row says instead
    tiny = options["tiny"]
    micro = options["batch_size"] or (4 if tiny else 32)
    steps = options["steps"] or (1 if tiny else 3)
    warmup = options["warmup"] if options["warmup"] is not None else (1 if tiny else 2)
    repeats = options["repeats"]
    # a second Accelerator shares the process group (AcceleratorState) and brings its own DDP kwargs
    acc = Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[ddp_kwargs(train)])
    cfg = model_cfg(tiny)
    torch.manual_seed(0)
    model = VAE(cfg).to(acc.device)
    model, opt = acc.prepare(model, torch.optim.Adam(model.parameters(), lr=1e-4, fused=True))
    step = TrainStep(acc, model, opt, LossConfig(), grad_clip=0.0, compile_mode=None, channels_last=False,
                     accum_steps=train.grad_accum_steps)
    x = torch.rand(micro * train.grad_accum_steps, 3, cfg.image_size, cfg.image_size, device=acc.device)

    def steps_of(sync_grads: bool):
        def run():
            for _ in range(steps):
                if sync_grads:
                    step(x, 1e-4, 1.0)
                else:
                    with acc.no_sync(model):  # the same step, every all-reduce skipped
                        step(x, 1e-4, 1.0)
        return run

    # The step and its compute alone, window by window side by side, so that a drift of the
    # machine's speed (a CPU's neighbours) falls on both; exposed = the median difference.
    synced, local = steps_of(True), steps_of(False)
    for _ in range(warmup):
        synced()
    pairs = []
    for _ in range(repeats):
        step_window = _timed_ms(synced, 0, 1, acc.device)[0]
        local_window = None if train.ddp_static_graph else _timed_ms(local, 0, 1, acc.device)[0]
        pairs.append((step_window, local_window))
    step_times = [a for a, _ in pairs]
    step_ms = statistics.median(step_times)
    if train.ddp_static_graph:  # no no_sync to measure its own compute with: the default step's
        compute_ms = compute[train.grad_accum_steps]
        exposed_ms = max(0.0, step_ms - compute_ms)
    else:
        compute_ms = compute[train.grad_accum_steps] = statistics.median(b for _, b in pairs)
        exposed_ms = max(0.0, statistics.median(a - b for a, b in pairs))
    # the gradient buckets as DDP formed them, all-reduced alone in the dtype on the wire
    wire = WIRE_DTYPES.get(train.ddp_comm_hook, torch.float32)
    buckets = [b.buffer().numel() for b in model.reducer._get_zeros_like_grad_buckets()]
    tensors = [torch.ones(n, dtype=wire, device=acc.device) for n in buckets]

    def all_buckets():
        for _ in range(steps):
            for t in tensors:
                dist.all_reduce(t)

    alone_ms, _ = _timed_ms(all_buckets, 1, repeats, acc.device)
    per_step = {k: v / steps for k, v in (("step_ms", step_ms), ("compute_ms", compute_ms), ("alone_ms", alone_ms))}
    exposed = exposed_ms / steps
    wire_bytes = sum(buckets) * torch.empty((), dtype=wire).element_size()
    world = acc.num_processes
    row = {"name": name, "kind": "step", "knobs": overrides, "batch_size": micro * train.grad_accum_steps,
           "micro_batch": micro, "grad_accum_steps": train.grad_accum_steps, "steps": steps,
           "img_per_s": micro * train.grad_accum_steps * world * 1e3 / per_step["step_ms"],
           "repeats": [micro * train.grad_accum_steps * world * steps * 1e3 / t for t in step_times],
           **per_step, "exposed_comm_ms": exposed, "buckets_mib": [n * 4 / 2**20 for n in buckets],
           "wire_mib": wire_bytes / 2**20,
           "alpha_beta_ms": len(buckets) * fit["latency_ms"] + wire_bytes / fit["algbw_gb_s"] / 1e6}
    if train.ddp_comm_hook == "powersgd":
        row["note"] = "alone_ms: the uncompressed buckets; powersgd sends far less"
    else:
        row["overlap"] = min(1.0, max(0.0, 1 - exposed / per_step["alone_ms"])) if per_step["alone_ms"] > 0 else None
    acc.free_memory()
    return row


if __name__ == "__main__":
    _worker(sys.argv[1], json.loads(sys.argv[2]))
