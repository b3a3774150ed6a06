"""The sync point and the metrics window: what the steps since the last train row did.

The step (step.py) adds its loss terms and counters to device meters. Every
`log.log_every` steps, and at the last, `MetricsWindow.sync` reads them (`read_window`),
averaged over ranks together with the stop signal: the host's only read of the device
between log points (SYNC). It counts them into the run's totals, enforces
train.max_bad_steps, and turns them, with the window's wall time, into the train row of
metrics.jsonl and W&B: throughput, the share of time spent waiting for data, the ETA, model
FLOP/s and MFU. Side work (evaluation, checkpoints, pictures) is timed apart and left out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vae_dist.errors import SharedError
from vae_dist.step import GOOD, RECON, SKIPPED, TrainStep


class DivergedError(SharedError):
    """Raised by every rank at the same sync point (the counters it reads are all-reduced), so
    the run reports it once."""


class Stopwatch:
    """Adds up the seconds spent inside its `with` blocks (a class, not a generator: the
    loop enters one every step)."""

    __slots__ = ("seconds", "_t0")

    def __init__(self):
        self.seconds, self._t0 = 0.0, 0.0

    def __enter__(self):
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds += time.perf_counter() - self._t0


@dataclass(frozen=True)
class WindowMeters:
    """One sync point's window, the same on every rank."""

    loss: float  # loss, recon, kl, kl_objective, grad_norm: sums over the window's good steps,
    recon: float  # each rank's, averaged over ranks
    kl: float  # the real KL (the ELBO's)
    kl_objective: float  # the KL the objective penalizes (clamped by loss.free_bits)
    grad_norm: float
    good: float  # good steps (mean over ranks)
    skipped: int  # non-finite steps skipped, and the rest: the maximum over ranks
    consecutive: int  # non-finite steps in a row now
    max_consecutive: int  # their longest run in the window
    stop_signal: int  # the highest signal any rank received (0: none)
    folder_lost: int  # 1: rank 0 found the run folder gone, replaced or read-only (the Trainer stops)


def read_window(accelerator, step: TrainStep, stop_received: int, folder_lost: bool = False) -> WindowMeters:
    """The window's meters, agreed by every rank; starts a fresh window. Collective: two small
    all-reduces, then one host read (SYNC)."""
    window = step.take_meters()
    sums = accelerator.reduce(window[:GOOD + 1], reduction="mean")  # collective: all ranks
    flags = torch.cat([window[SKIPPED:], window.new_tensor([stop_received, folder_lost])])
    flags = accelerator.reduce(flags, reduction="max")  # collective: all ranks
    values = torch.cat([sums, flags]).tolist()  # SYNC: the only host read between sync points
    return WindowMeters(*values[:GOOD + 1], *(int(v) for v in values[GOOD + 1:]))


def unsynced_recon(accelerator, step: TrainStep) -> tuple[float, float]:
    """(recon sum, good steps) of the current window, not yet synced, averaged over ranks as
    at a sync point. Collective: evaluations and checkpoints, where every rank is."""
    window = accelerator.reduce(step.meters[[RECON, GOOD]], reduction="mean")
    recon, good = window.tolist()  # SYNC: evaluations and checkpoints only
    return recon, good


class MetricsWindow:
    """The steps since the last train row: their wall time, the part of it spent waiting for
    the loader (`data_wait`) and the part spent on side work (`side_work`, not training)."""

    def __init__(self, accelerator, step: TrainStep, hooks, *, log_every: int, batch_size: int, total_steps: int,
                 lr_at, beta_at, max_bad_steps: int, flops_per_image: float, peak_flops: float | None, free_bits: float):
        self.accelerator, self.step, self.hooks = accelerator, step, hooks
        self.world, self.device = accelerator.num_processes, accelerator.device
        self.log_every, self.batch_size, self.total_steps = log_every, batch_size, total_steps
        self.lr_at, self.beta_at, self.max_bad_steps = lr_at, beta_at, max_bad_steps  # schedules; train.max_bad_steps
        self.flops_per_image, self.peak_flops = flops_per_image, peak_flops  # model FLOPs; one device's peak
        self.free_bits = free_bits
        self.data_wait, self.side_work = Stopwatch(), Stopwatch()
        self.restart(0)

    def due(self, step: int) -> bool:
        """A sync point: every log.log_every steps and at the last."""
        return step % self.log_every == 0 or step == self.total_steps

    def sync(self, state, stop_received: int, folder_lost: bool = False) -> WindowMeters:
        """The sync point: the window's meters, agreed by every rank, counted into `state`; its
        train row logged; train.max_bad_steps enforced (so up to log.log_every steps late).
        Returns the meters: the stop signal and the lost run folder every rank agrees on, read
        before any row is written (a lost folder gets none). Collective."""
        m = read_window(self.accelerator, self.step, stop_received, folder_lost)  # SYNC
        if m.folder_lost:
            return m
        state.add_window(m)
        if m.good or m.skipped:  # the window trained: its row
            last = state.step - 1
            self.hooks.log_scalars(self.train_row(state, m, self.lr_at(last), self.beta_at(last)))
            self.restart(state.step)  # after the row is written: writing it is not training
        if m.max_consecutive >= self.max_bad_steps:
            raise DivergedError(f"{m.max_consecutive} non-finite steps in a row by step {state.step}: training "
                                f"diverged (lower optim.lr, set optim.grad_clip, or use fp32/bf16 instead of fp16)")
        return m

    def restart(self, step: int) -> None:
        self.start_step = step
        self.data_wait.seconds = self.side_work.seconds = 0.0
        self._t0 = time.perf_counter()

    def train_row(self, state, m: WindowMeters, lr: float, beta: float) -> dict:
        """The train row for the window that ends at `state.step`."""
        step, epoch, skipped_steps = state.step, state.epoch, state.skipped_steps
        elapsed = time.perf_counter() - self._t0 - self.side_work.seconds
        steps = step - self.start_step
        img_per_s = steps * self.batch_size * self.world / elapsed if elapsed > 0 else 0.0
        # means over the window's good steps; a window of skipped steps only has none: NaN, not 0
        n = m.good if m.good > 0 else float("nan")
        row = {
            # kl is the real KL; loss is the objective, whose KL free bits may clamp. No ELBO here:
            # -(recon + kl) of the seed's MSE objective is no likelihood (DESIGN.md, Likelihood), and
            # under one name with the val rows' discretized bound it read as the same quantity. The
            # ELBO is the val row's `elbo_nats` (and `bpd`); recon and kl are both in this row.
            "step": step, "epoch": epoch, "loss": m.loss / n, "recon": m.recon / n, "kl": m.kl / n,
            "beta": beta, "lr": lr, "grad_norm": m.grad_norm / n,
            "skipped": m.skipped,  # non-finite steps skipped in this window (skipped_steps: the run's)
            "img_per_s": img_per_s, "img_per_s_per_process": img_per_s / self.world,
            "data_wait": self.data_wait.seconds / elapsed if elapsed > 0 else 0.0,
            "skipped_steps": skipped_steps, "total_steps": self.total_steps, "progress": step / self.total_steps,
            # at this window's pace (side work excluded), which is what the rest will run at
            "eta_s": (self.total_steps - step) * elapsed / max(steps, 1),
            # model FLOP/s over all processes; mfu per device against its dense peak
            "tflop_per_s": img_per_s * self.flops_per_image / 1e12,
        }
        if self.free_bits > 0:
            row["kl_objective"] = m.kl_objective / n  # the KL with each dim clamped at loss.free_bits
        if self.peak_flops:
            row["mfu"] = img_per_s / self.world * self.flops_per_image / self.peak_flops
        if self.device.type == "cuda":
            row["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return row
