"""The training state beyond model and optimizer, and the Trainer's checkpoints of it.

`TrainState` is what an exact resume needs besides the weights, the optimizer and the
scaler: the step, the data position, the non-finite-step counters, the σ calibration's sums.
`TrainCheckpoints` assembles a checkpoint's trainer state (the counters up to this very step,
not the last sync point; the hooks' own state) and writes it at most once a step through
checkpoint.py; `load` restores a run from one.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from vae_dist import checkpoint as ckpt
from vae_dist.errors import counted
from vae_dist.metrics import WindowMeters, unsynced_recon
from vae_dist.step import CONSECUTIVE, SKIPPED, TrainStep


@dataclass
class TrainState:
    step: int = 0  # optimizer steps taken (skipped non-finite steps count too)
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed: the data position
    bad_steps: int = 0  # consecutive non-finite steps (as of the last sync point)
    skipped_steps: int = 0  # non-finite steps in the whole run (as of the last sync point)
    # The MSE decoder's sigma for val bits/dim: the train recon terms summed over the good
    # steps since the last evaluation (each step's mean over ranks, as of the last sync
    # point), so one value agreed by every rank whatever log.log_every is; and the last sigma.
    sigma_recon: float = 0.0
    sigma_steps: float = 0.0
    sigma: float | None = None
    last_eval_step: int = -1  # the step last evaluated: a resume there does not evaluate it again
    resumes: int = 0  # starts of this run after its first: marks the W&B rows each start logged

    def add_window(self, m: WindowMeters) -> None:
        """A sync point's window, counted into the run's totals."""
        self.sigma_recon += m.recon
        self.sigma_steps += m.good
        self.bad_steps = m.consecutive
        self.skipped_steps += m.skipped


class TrainCheckpoints:
    """The run's checkpoints as the Trainer writes and reads them. Collective: every rank
    calls `save` (rank 0 writes the shared files, each rank its RNG) and `load`."""

    def __init__(self, accelerator, run_dir: Path, model, optimizer, step: TrainStep, config_yaml: str, *,
                 batch_size: int, hooks, every: int, keep_last: int, data: dict | None = None,
                 max_bad_steps: int = 20):
        self.accelerator, self.run_dir, self.model, self.optimizer = accelerator, run_dir, model, optimizer
        self.step, self.config_yaml, self.batch_size, self.hooks = step, config_yaml, batch_size, hooks
        self.every, self.keep_last = every, keep_last  # train.checkpoint_every, train.keep_last
        self.data = data  # the shards trained on (ShardSet.identity): a resume on others is refused
        # non-finite steps in a row that stop a checkpoint: any, except under fp16, whose loss scaler
        # overflows now and then as its routine (those steps are skipped, the weights unchanged)
        self.nonfinite_limit = 1 if accelerator.scaler is None else max(2, max_bad_steps // 2)
        self.last_step = -1
        self.resume_note = ""  # what `load` changed (another process count or batch): the start line says it

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, state: TrainState) -> bool:
        """Writes the checkpoint of `state.step`; False where it is not written because the
        latest steps were non-finite (diverging weights are never checkpointed, so neither
        resume=auto nor eval meets them: the newest checkpoint stays the last good one)."""
        if self.last_step == state.step:  # a step is written once (a stop at a checkpoint step)
            return True
        m = self.step.meters  # the counters up to this very step, not the last sync point
        # the same on every rank: a step is skipped on the norm of the all-reduced gradients
        skipped, consecutive = m[SKIPPED:CONSECUTIVE + 1].tolist()  # SYNC: checkpoints only
        if consecutive >= self.nonfinite_limit:
            if self.accelerator.is_main_process:
                newest = ckpt.newest_verified_checkpoint(self.run_dir)
                print(f"vae-dist: warning: no checkpoint at step {state.step}: its last {int(consecutive)} steps were "
                      f"non-finite (skipped); the newest checkpoint stays {newest.name if newest else 'none'}",
                      file=sys.stderr, flush=True)
            return False
        self.last_step = state.step
        window_recon, window_good = unsynced_recon(self.accelerator, self.step)  # collective
        saved = dict(dataclasses.asdict(state), batch_size=self.batch_size, bad_steps=int(consecutive),
                     skipped_steps=state.skipped_steps + int(skipped), sigma_recon=state.sigma_recon + window_recon,
                     sigma_steps=state.sigma_steps + window_good, data=self.data, **self.hooks.checkpoint_state())
        path = ckpt.save_checkpoint(self.accelerator, self.run_dir, self.model, self.optimizer, saved,
                                    self.config_yaml, self.keep_last)
        self.hooks.on_checkpoint(path)
        return True

    def load(self, path: Path, *, steps_per_epoch: int) -> tuple[TrainState, int | None]:
        """Restores model, optimizer, scaler and RNG from a checkpoint that `choose_start`
        verified; returns the training state to go on from, and the W&B step saved with it
        (log.wandb_resume=rewind)."""
        saved = ckpt.load_checkpoint(self.accelerator, path, self.model, self.optimizer)
        match_state_layouts(self.step.raw_optimizer)  # e.g. a CPU checkpoint resumed channels_last
        self.step.bind_lr()  # the loaded param groups brought their own lr values
        # fields a checkpoint of an older version lacks keep their defaults
        state = TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState) if f.name in saved})
        state.resumes += 1
        self.step.meters[CONSECUTIVE] = state.bad_steps
        self.resume_note = ""
        world, was_world = self.accelerator.num_processes, saved.get("world_size")
        was_batch = saved.get("batch_size")
        if was_world != world or was_batch != self.batch_size or state.batch_in_epoch >= steps_per_epoch:
            # a different split of the data (or an older checkpoint written at an epoch's last
            # batch): continue from the next epoch boundary, and say so in plain words
            if (was_world, was_batch) != (world, self.batch_size) and was_world and was_batch:
                self.resume_note = (
                    f"; it was written by {counted(was_world, 'process', 'processes')} at a global batch of "
                    f"{was_world * was_batch}, this run has {counted(world, 'process', 'processes')} at a global "
                    f"batch of {world * self.batch_size}, so the data splits differently: "
                    + (f"the rest of epoch {state.epoch} is skipped (the checkpoint was {state.batch_in_epoch} of its "
                       f"batches into it) and this run starts epoch {state.epoch + 1} at step {state.step}"
                       if state.batch_in_epoch else f"this run starts epoch {state.epoch} afresh"))
            state.epoch += state.batch_in_epoch > 0
            state.batch_in_epoch = 0
        self.last_step = state.step
        return state, saved.get("wandb_step")


def match_state_layouts(optimizer) -> None:
    """Gives every optimizer state tensor (Adam's moments) its parameter's memory layout.
    `load_state_dict` keeps the saved strides, so a checkpoint written without channels_last
    (any CPU run) and resumed with it (the CUDA default) would hand fused Adam moments whose
    strides differ from their parameters'; its kernels want them alike."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == p.shape and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)  # empty_like keeps p's strides
