"""torch.profiler over a range of training steps: a Chrome trace, and a summary that says
whether a step is bound by its kernels, by launching them (the host), or by host syncs.

Used by `train.profile_steps=START,STOP` (the run's `profile/` folder) and by
`vae-dist bench step --profile DIR`. Open the trace in chrome://tracing or Perfetto.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

# CUDA runtime/driver calls that launch work, and those that make the host wait for the device
# (cudaStreamWaitEvent is not one: the wait is the device's, between streams)
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch",
            "cudaMemcpyAsync", "cudaMemsetAsync")
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


# Lines libkineto (the profiler's C++ side) writes to fd 2 that report nothing wrong:
# - a CUDA build of torch on a machine without a GPU driver: the trace's device properties ask
#   cudaGetDeviceCount, which fails (code 35: no driver, 100: no device) and is logged at ERROR,
#   whatever activities were asked for (kineto's DeviceProperties.cpp);
# - newer kineto's USDT markers (`USDT:... profiler_start`, `profiler_stop`), meant for tracing
#   probes, logged at a level above ERROR, so torch's default (ERROR) shows them.
# KINETO_LOG_LEVEL would hide them only together with every real error, so these lines alone are
# taken out of what the profiler writes while it starts and stops, on a run that profiles no CUDA
# device (the quiet a CPU run asks for); everything else passes on. A GPU run's stderr is left as
# it comes: there a failed device count is a real error.
_NO_GPU_LINE = re.compile(r"^ERROR:.* DeviceProperties\.cpp:\d+\] gpuGetDeviceCount failed with code (35|100)$")
_USDT_LINE = re.compile(r"^USDT:.*\] profiler_(start|stop)$")


def _is_kineto_noise(line: str) -> bool:
    return bool(_USDT_LINE.match(line) or _NO_GPU_LINE.match(line))


@contextlib.contextmanager
def _without_kineto_noise(cuda: bool):
    """fd 2 through a file for the block (libkineto writes there from C++, past sys.stderr); then
    every line of it but kineto's noise on to the real fd 2. Only where no CUDA device is profiled
    (the noise is a machine without a GPU driver's; on a GPU every line stays as it comes), and
    only where it can be done: with fd 2 closed, or no temporary file to be had ($TMPDIR full or
    unwritable), the block runs unfiltered rather than failing the run."""
    if cuda:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        held = tempfile.TemporaryFile()
    except OSError:
        os.close(saved)
        yield
        return
    with held:
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            # fd 2 is put back first, whatever follows: a crash inside the block still shows its reason
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            lines = held.read().decode("utf-8", errors="replace").splitlines(keepends=True)
            kept = "".join(line for line in lines if not _is_kineto_noise(line.rstrip("\n")))
            _write_all(2, kept.encode())


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (it may write fewer than it is given)."""
    while data:
        data = data[os.write(fd, data):]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(prof, steps: int, wall_s: float, device: torch.device) -> dict:
    """Per step: host wall time, device kernel time, launches, host syncs, aten ops; and a verdict."""
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    out = {"steps": steps, "wall_ms_per_step": 1e3 * wall_s / steps, "aten_ops_per_step": ops / steps}
    top = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    out["top_host_ops"] = [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in top]
    if device.type != "cuda":
        out["bound_by"] = "host (a CPU runs every op where it is launched)"
        return out
    # Launches and syncs of the thread that ran the steps only (a DALI thread's own syncs are
    # not the step's); the device's busy time as the union of its kernels' intervals, so
    # overlapping streams are not counted twice.
    raw = list(prof.events())
    threads = Counter(e.thread for e in raw if e.name.startswith("aten::"))
    main = threads.most_common(1)[0][0] if threads else None
    on_main = [e for e in raw if e.thread == main]
    kernels = sorted((e.time_range.start, e.time_range.end) for e in raw
                     if str(getattr(e, "device_type", "")).endswith("CUDA"))
    busy_us, end = 0.0, float("-inf")
    for start, stop in kernels:
        busy_us += max(0.0, stop - max(start, end))
        end = max(end, stop)
    out.update(kernel_ms_per_step=busy_us / 1e3 / steps, kernels_per_step=len(kernels) / steps,
               launches_per_step=sum(e.name in LAUNCHES for e in on_main) / steps,
               syncs_per_step=sum(e.name in SYNCS for e in on_main) / steps)
    busy = min(1.0, out["kernel_ms_per_step"] / max(out["wall_ms_per_step"], 1e-9))
    out["device_busy"] = busy
    if out["syncs_per_step"] >= 1:
        out["bound_by"] = f"host syncs ({out['syncs_per_step']:.1f} per step)"
    elif busy >= 0.8:
        out["bound_by"] = f"kernels (the GPU is busy {busy:.0%} of the step)"
    else:
        out["bound_by"] = (f"launches / host work (the GPU is busy {busy:.0%} of the step, "
                           f"{out['launches_per_step']:.0f} launches per step)")
    return out


def profile_steps(run_step, steps: int, device: torch.device, out_dir: Path, name: str) -> dict:
    """Profiles `steps` calls of run_step(); writes OUT/NAME.trace.json and NAME.summary.json."""
    profiler = StepRangeProfiler((0, steps), out_dir, device, rank=0, name=name)
    for step in range(steps):
        profiler.before_step(step)
        run_step()
        profiler.after_step(step + 1)
    return profiler.summary


class StepRangeProfiler:
    """Profiles steps START..STOP-1: the Trainer's `train.profile_steps=START,STOP`, and
    `profile_steps` for the benchmarks. The files are named NAME, else after the steps and rank."""

    def __init__(self, steps: tuple[int, int] | None, out_dir: Path, device: torch.device, rank: int,
                 name: str | None = None):
        self.start, self.stop = steps if steps else (None, None)
        self.out_dir, self.device, self.rank, self.name = Path(out_dir), device, rank, name
        self._prof = None
        self._t0 = 0.0
        self.summary: dict | None = None

    def before_step(self, step: int) -> None:
        if step == self.start and self._prof is None:
            # what the machine has: the host always, the GPU where the run is on one
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            _sync(self.device)
            self._prof = profile(activities=activities, acc_events=True)  # one cycle; torch 2.11 warns without
            with _without_kineto_noise(self.device.type == "cuda"):
                self._prof.__enter__()
            self._t0 = time.perf_counter()

    def after_step(self, step: int) -> None:
        """`step`: the steps taken so far. Ends the range at STOP (or at the run's end: close)."""
        if self._prof is not None and step >= self.stop:
            self.close(step)

    def close(self, step: int) -> None:
        if self._prof is None:
            return
        _sync(self.device)
        wall = time.perf_counter() - self._t0
        prof, self._prof = self._prof, None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        name = self.name or f"steps_{self.start}-{step}_rank{self.rank}"
        with _without_kineto_noise(self.device.type == "cuda"):  # the trace is processed here and at export
            prof.__exit__(None, None, None)
            prof.export_chrome_trace(str(self.out_dir / f"{name}.trace.json"))
        self.summary = summarize(prof, max(1, step - self.start), wall, self.device)
        (self.out_dir / f"{name}.summary.json").write_text(json.dumps(self.summary, indent=1))
