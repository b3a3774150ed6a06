"""The Trainer: Accelerate DDP + mixed precision + torch.compile over the shard loaders.

    vae-dist train --train.max_steps=1000                       # one process
    accelerate launch --config_file accelerate_config.yaml -m vae_dist train ...

The loop reads like a paragraph: train_step, then components that decide their own timing
(log, eval, checkpoint, pictures). All ranks run the same steps and enter the same
collectives; only rank 0 writes (see hooks.py). Host-device syncs are marked SYNC.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, TorchDynamoPlugin, set_seed

from vae_dist import checkpoint as ckpt
from vae_dist.config import Config, dump_yaml, vae_config
from vae_dist.data.loaders import build_train_and_val, resolve_loader_kind
from vae_dist.errors import ConfigError, UserError
from vae_dist.hooks import make_hooks
from vae_dist.losses import bits_per_dim, kl_divergence, make_kl_schedule, psnr, recon_loss
from vae_dist.model import VAE


@dataclass
class TrainState:
    """Everything beyond model/optimizer/scaler that an exact resume needs."""

    step: int = 0  # optimizer steps taken (skipped non-finite steps count too)
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed: the data position
    bad_steps: int = 0  # consecutive non-finite steps
    skipped_steps: int = 0  # non-finite steps in the whole run


class DivergedError(UserError):
    pass


class StopSignal:
    """Remembers SIGTERM/SIGINT (preemption, Ctrl-C) so the loop can checkpoint and leave."""

    def __init__(self):
        self.signum = 0
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def lr_at(step: int, total_steps: int, optim) -> float:
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.lr_schedule == "constant":
        return optim.lr
    progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    floor = optim.lr * optim.min_lr_ratio
    return floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        on_cuda = torch.cuda.is_available()
        compile_model = cfg.model.compile if cfg.model.compile is not None else on_cuda
        plugin = TorchDynamoPlugin(backend="inductor", mode=cfg.model.compile_mode) if compile_model else None
        self.accelerator = acc = Accelerator(
            # Without CUDA, accelerate only forms a (gloo) process group when told cpu=True;
            # otherwise `accelerate launch --multi_gpu` on a CPU machine runs N separate jobs.
            cpu=not on_cuda,
            dynamo_plugin=plugin,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        )
        self.compiled = compile_model
        self.device = acc.device
        self.world, self.rank = acc.num_processes, acc.process_index
        self.run_dir = Path(cfg.train.out_dir)
        self.batch_size = self._per_process_batch()
        if acc.mixed_precision == "bf16" and self.device.type == "cpu":
            acc.print("vae-dist: warning: bf16 autocast on this CPU is many times slower than fp32")

        # Same weights on every rank (DDP also broadcasts them), then a per-rank stream for
        # the reparameterization noise.
        set_seed(cfg.train.seed)
        model = VAE(vae_config(cfg.model))
        self.channels_last = cfg.model.channels_last if cfg.model.channels_last is not None else on_cuda
        model = model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        torch.manual_seed(cfg.train.seed * 1000 + self.rank)
        fused = cfg.optim.fused if cfg.optim.fused is not None else self.device.type == "cuda"
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                     weight_decay=cfg.optim.weight_decay, fused=fused or None)

        self.train_loader, self.val_loader = build_train_and_val(
            cfg.data, self.batch_size, rank=self.rank, world=self.world, device=self.device, seed=cfg.train.seed)
        self.steps_per_epoch = self.train_loader.steps_per_epoch
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.beta_at = make_kl_schedule(cfg.loss, self.total_steps)

        self.model, self.optimizer = acc.prepare(model, optimizer)  # DDP wrap (+ compile)
        self.raw_model: VAE = acc.unwrap_model(self.model, keep_torch_compile=False)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.state = TrainState()
        self.config_yaml = dump_yaml(cfg)
        self.hooks = make_hooks(acc, cfg, self.run_dir, self.val_loader)
        self._reset_meters()
        self._last_eval_step = self._last_ckpt_step = -1

    # -- setup helpers -------------------------------------------------------------------
    def _per_process_batch(self) -> int:
        t = self.cfg.train
        if t.global_batch_size is None:
            return t.batch_size
        if t.global_batch_size % self.world:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} does not divide by {self.world} processes")
        return t.global_batch_size // self.world

    def _reset_meters(self):
        self._sums = torch.zeros(4, device=self.device)  # loss, recon, kl, grad_norm
        self._meter_steps = 0
        self._window_start = self.state.step
        self._data_wait = 0.0
        self._side_time = 0.0  # eval, checkpoints, pictures: not part of training throughput
        self._t0 = time.perf_counter()

    def maybe_resume(self) -> None:
        choice = self.cfg.train.resume
        if choice == "none":
            return
        path = ckpt.latest_checkpoint(self.run_dir) if choice == "auto" else Path(choice)
        if path is None:
            return
        if not path.exists():
            raise UserError(f"train.resume: checkpoint not found: {path}")
        saved = ckpt.load_checkpoint(self.accelerator, path, self.raw_model, self.optimizer)
        self.state = TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState)})
        if saved.get("world_size") != self.world or saved.get("batch_size") != self.batch_size:
            # a different split of the data: continue from the next epoch boundary instead
            self.state.epoch += self.state.batch_in_epoch > 0
            self.state.batch_in_epoch = 0
        self._last_ckpt_step = self.state.step
        self._reset_meters()
        self.accelerator.print(f"resumed from {path} at step {self.state.step} (epoch {self.state.epoch})")

    # -- the loop ------------------------------------------------------------------------
    def fit(self) -> int:
        self.maybe_resume()
        self.hooks.on_train_start(self.config_yaml, self.describe())
        stop = StopSignal()
        try:
            while self.state.step < self.total_steps and not stop.signum:
                batches = self.train_loader.epoch(self.state.epoch, skip=self.state.batch_in_epoch)
                exhausted = False
                while self.state.step < self.total_steps:
                    t_wait = time.perf_counter()
                    batch = next(batches, None)
                    self._data_wait += time.perf_counter() - t_wait
                    if batch is None:
                        exhausted = True
                        break
                    self.train_step(batch[0])
                    self.maybe_log()
                    t_side = time.perf_counter()
                    self.maybe_eval()
                    self.maybe_checkpoint()
                    self.hooks.maybe_images(self.state.step, self.raw_model)
                    self._side_time += time.perf_counter() - t_side
                    if self._stop_requested(stop):
                        break
                batches.close()
                if exhausted or self.state.batch_in_epoch >= self.steps_per_epoch:
                    self.end_epoch()
            if stop.signum:
                self.checkpoint()
                self.accelerator.print(f"stopped by signal {stop.signum} at step {self.state.step}; "
                                       f"checkpoint saved; continue with train.resume=auto")
                self.hooks.close()
                return 128 + stop.signum
            self.finish()
            return 0
        finally:
            stop.restore()

    def train_step(self, images: torch.Tensor) -> None:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        step = self.state.step
        lr = lr_at(step, self.total_steps, self.cfg.optim)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        beta = self.beta_at(step)
        self.model.train()
        with self.accelerator.autocast():
            x_hat, mu, logvar = self.model(images)
        recon = recon_loss(x_hat, images, self.cfg.loss.recon)
        kl = kl_divergence(mu, logvar, self.cfg.loss.free_bits)
        loss = recon + beta * kl
        self.accelerator.backward(loss)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = self.accelerator.clip_grad_norm_(self.params, max_norm)
        # Gradients are already averaged over ranks, so every rank sees the same norm and
        # takes the same decision without another collective.
        finite = bool(torch.isfinite(grad_norm))  # SYNC: one per step, to skip bad updates
        if finite or self.accelerator.mixed_precision == "fp16":
            self.optimizer.step()  # fp16: the grad scaler skips inf steps itself and backs off
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.batch_in_epoch += 1
        if finite:
            self.state.bad_steps = 0
            self._sums += torch.stack([loss.detach(), recon.detach(), kl.detach(), grad_norm.detach().float()])
            self._meter_steps += 1
        else:
            self.state.bad_steps += 1
            self.state.skipped_steps += 1
            if self.state.bad_steps >= self.cfg.train.max_bad_steps:
                raise DivergedError(
                    f"{self.state.bad_steps} non-finite steps in a row at step {step}: training diverged "
                    f"(lower optim.lr, set optim.grad_clip, or use fp32/bf16 instead of fp16)")

    def _stop_requested(self, stop: StopSignal) -> bool:
        # Ranks may get the signal at different steps: agree through a MAX all-reduce so all
        # of them enter the checkpoint collective at the same step.
        if self.world == 1:
            return bool(stop.signum)
        flag = torch.tensor([stop.signum], device=self.device, dtype=torch.int64)
        flag = self.accelerator.reduce(flag, reduction="max")
        stop.signum = int(flag.item())  # SYNC
        return bool(stop.signum)

    def maybe_log(self) -> None:
        if self.state.step % self.cfg.log.log_every and self.state.step != self.total_steps:
            return
        if self._meter_steps == 0 and self.state.bad_steps == 0:
            return
        sums = self.accelerator.reduce(self._sums, reduction="mean")  # collective: all ranks
        elapsed = time.perf_counter() - self._t0 - self._side_time
        n = max(1, self._meter_steps)
        loss, recon, kl, grad_norm = (sums / n).tolist()  # SYNC: only where logged
        steps = self.state.step - self._window_start
        img_per_s = steps * self.batch_size * self.world / elapsed if elapsed > 0 else 0.0
        row = {
            "step": self.state.step, "epoch": self.state.epoch, "loss": loss, "recon": recon, "kl": kl,
            "elbo": -(recon + kl), "beta": self.beta_at(self.state.step - 1),
            "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
            "img_per_s": img_per_s, "img_per_s_per_process": img_per_s / self.world,
            "data_wait": self._data_wait / elapsed if elapsed > 0 else 0.0,
            "skipped_steps": self.state.skipped_steps,
        }
        if self.device.type == "cuda":
            row["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.hooks.log_scalars(row)
        self._reset_meters()

    def maybe_eval(self) -> None:
        every = self.cfg.train.eval_every
        if every and self.state.step % every == 0:
            self.evaluate()

    def maybe_checkpoint(self) -> None:
        every = self.cfg.train.checkpoint_every
        if every and self.state.step % every == 0:
            self.checkpoint()

    def end_epoch(self) -> None:
        self.state.epoch += 1
        self.state.batch_in_epoch = 0
        t_side = time.perf_counter()
        self.evaluate()
        self._side_time += time.perf_counter() - t_side

    def finish(self) -> None:
        self.evaluate()
        self.checkpoint()
        self.hooks.maybe_images(self.state.step, self.raw_model, final=True)
        if self.accelerator.is_main_process:
            ckpt.save_weights(self.raw_model, self.run_dir / ckpt.WEIGHTS)
        self.accelerator.wait_for_everyone()
        self.hooks.close(weights=self.run_dir / ckpt.WEIGHTS)

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Val metrics over every val sample once (each rank its own part), summed over ranks."""
        if self._last_eval_step == self.state.step:
            return None
        self._last_eval_step = self.state.step
        model = self.raw_model  # eager and unwrapped: ranks may run different batch counts here
        model.eval()
        sums = torch.zeros(4, device=self.device, dtype=torch.float64)  # recon, kl, sq_err(mu), images
        limit = self.cfg.train.eval_batches
        for i, (x, _) in enumerate(self.val_loader.epoch(0)):
            if limit is not None and i >= limit:
                break
            with self.accelerator.autocast():
                x_hat, mu, logvar = model(x)
                x_mean = model.decode(mu)
            n = x.shape[0]
            sums += torch.stack([
                recon_loss(x_hat, x, "sum") * n, kl_divergence(mu, logvar) * n,
                (x_mean.float() - x).pow(2).sum(), torch.tensor(float(n), device=self.device),
            ]).double()
        model.train()
        sums = self.accelerator.reduce(sums, reduction="sum")  # collective: all ranks
        recon, kl, sq_err, count = sums.tolist()  # SYNC
        if count == 0:
            return None
        pixels = model.cfg.in_channels * model.cfg.image_size**2
        nelbo = (recon + kl) / count
        row = {
            "split": "val", "step": self.state.step, "epoch": self.state.epoch, "loss": nelbo,
            "recon": recon / count, "kl": kl / count, "elbo": -nelbo, "bpd": bits_per_dim(nelbo, pixels),
            "psnr": psnr(sq_err / (count * pixels)), "images": int(count),
        }
        self.hooks.log_eval(row)
        return row

    def checkpoint(self) -> None:
        if self._last_ckpt_step == self.state.step:
            return
        self._last_ckpt_step = self.state.step
        state = dict(dataclasses.asdict(self.state), batch_size=self.batch_size)
        path = ckpt.save_checkpoint(self.accelerator, self.run_dir, self.raw_model, self.optimizer, state,
                                    self.config_yaml, self.cfg.train.keep_last)
        self.hooks.on_checkpoint(path)

    def _loader_name(self) -> str:
        data = self.cfg.data
        return f"cache-{data.cache}" if data.cache != "none" else resolve_loader_kind(data.loader)

    def describe(self) -> dict:
        acc = self.accelerator
        return {
            "processes": self.world, "device": str(self.device), "mixed_precision": acc.mixed_precision,
            "compile": self.cfg.model.compile_mode if self.compiled else "no",
            "channels_last": self.channels_last, "batch_per_process": self.batch_size,
            "global_batch": self.batch_size * self.world, "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps, "loader": self._loader_name(),
            "start_step": self.state.step,
        }


def train(cfg: Config) -> int:
    trainer = Trainer(cfg)
    code = trainer.fit()
    sys.stdout.flush()
    return code
