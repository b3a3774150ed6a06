"""The Trainer: Accelerate DDP + mixed precision + torch.compile over the shard loaders.

    vae-dist train --train.max_steps=1000                       # one process
    accelerate launch --config_file accelerate_config.yaml -m vae_dist train ...

The loop reads like a paragraph: a step (step.py), then components that decide their own
timing (sync point, eval, checkpoint, pictures). All ranks run the same steps and enter the
same collectives; only rank 0 writes (see hooks.py). The host reads the device only at sync
points (every `log.log_every` steps, marked SYNC): the meters, the non-finite-step counters
and the stop agreement travel in the same two small all-reduces.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list, set_seed

from vae_dist import checkpoint as ckpt
from vae_dist import step as meters
from vae_dist.config import Config, dump_yaml, vae_config
from vae_dist.data import unit_float
from vae_dist.data.loaders import (
    build_train_and_val,
    check_model_fits_shards,
    choose_cache,
    resolve_loader_kind,
    verify_shards,
)
from vae_dist.errors import ConfigError, SharedError, UserError
from vae_dist.flops import peak_flops, train_flops_per_image
from vae_dist.hooks import make_hooks
from vae_dist.losses import (
    bits_per_dim,
    discretized_gaussian_log_likelihood,
    kl_divergence,
    make_kl_schedule,
    psnr,
    recon_loss,
)
from vae_dist.model import VAE
from vae_dist.profiling import StepRangeProfiler
from vae_dist.run_folder import RunFolderLock, choose_start, expand_out_dir, record_slurm_job
from vae_dist.step import TrainStep


@dataclass
class TrainState:
    """Everything beyond model/optimizer/scaler that an exact resume needs."""

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


class DivergedError(UserError):
    pass


class StopSignal:
    """Remembers SIGTERM/SIGINT (preemption, Ctrl-C). `received` is this process's own;
    the loop acts only on `agreed`, which every rank sets at the same step."""

    def __init__(self):
        self.received = 0
        self.agreed = 0
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signum

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


def configure_cuda_math() -> None:
    """TF32 matmuls/convolutions and cuDNN autotuning: what a user of a GPU trainer expects
    (the seed VAE gains ~2x from TF32). Training and the step benchmark both run under it."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def make_accelerator(cfg: Config) -> Accelerator:
    on_cuda = torch.cuda.is_available()
    configure_cuda_math()
    # `accelerate launch` exports its precision (config file or --mixed_precision); it wins.
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ
    precision = cfg.train.precision if cfg.train.precision != "auto" else ("bf16" if on_cuda else "no")
    return Accelerator(
        # Without CUDA, accelerate only forms a (gloo) process group when told cpu=True;
        # otherwise `accelerate launch --multi_gpu` on a CPU machine runs N separate jobs.
        cpu=not on_cuda,
        mixed_precision=None if launched else precision,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
    )


class Trainer:
    def __init__(self, cfg: Config, accelerator: Accelerator | None = None):
        self.cfg = cfg
        self.accelerator = acc = accelerator or make_accelerator(cfg)
        self.device = acc.device
        on_cuda = self.device.type == "cuda"
        self.world, self.rank = acc.num_processes, acc.process_index
        self.run_dir = Path(cfg.train.out_dir)
        self.batch_size = self._per_process_batch()
        self.compile_mode = self._compile_mode()
        if acc.mixed_precision == "bf16" and not on_cuda:
            print_once(acc, "vae-dist: warning: bf16 autocast on this CPU is many times slower than fp32")

        check_model_fits_shards(cfg.model, cfg.data.shards)
        # Same weights on every rank (DDP also broadcasts them), then a per-rank stream for
        # the reparameterization noise.
        set_seed(cfg.train.seed)
        model = VAE(vae_config(cfg.model))
        self.channels_last = cfg.model.channels_last if cfg.model.channels_last is not None else on_cuda
        model = model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        torch.manual_seed(cfg.train.seed * 1000 + self.rank)
        # Fused Adam: one kernel for the update, whose found_inf input skips a non-finite step
        # on the device (step.py). The σ-VAE's scalar sigma gets its own, faster lr.
        groups = [{"params": [p for n, p in model.named_parameters() if n != "log_sigma"]}]
        if model.log_sigma is not None:
            groups.append({"params": [model.log_sigma], "lr_scale": cfg.optim.sigma_lr_scale, "weight_decay": 0.0})
        optimizer = torch.optim.Adam(groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                                     weight_decay=cfg.optim.weight_decay, fused=True)

        self.cache, self.data_choice = choose_cache(cfg.data, self.device)
        self.train_loader, self.val_loader = build_train_and_val(
            cfg.data, self.batch_size, rank=self.rank, world=self.world, device=self.device, seed=cfg.train.seed,
            cache=self.cache, val_limit=cfg.train.eval_images)
        self.steps_per_epoch = self.train_loader.steps_per_epoch
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.beta_at = make_kl_schedule(cfg.loss, self.total_steps)

        self.model, self.optimizer = acc.prepare(model, optimizer)  # DDP wrap
        self.raw_model: VAE = acc.unwrap_model(self.model)
        self.step = TrainStep(acc, self.model, self.optimizer, cfg.loss, cfg.optim.grad_clip, self.compile_mode,
                              self.channels_last)
        self.state = TrainState()
        self.config_yaml = dump_yaml(cfg)
        self.hooks = make_hooks(acc, cfg, self.run_dir, self.val_loader)
        # MFU: model FLOPs counted once for this configuration, against one device's peak
        self.flops_per_image = train_flops_per_image(self.raw_model.cfg)
        self.peak_flops = peak_flops(self.device, acc.mixed_precision, cfg.log.peak_tflops)
        self.profiler = StepRangeProfiler(cfg.train.profile_steps, self.run_dir / "profile", self.device, self.rank)
        self._reset_window()
        self._last_ckpt_step = -1
        self._wandb_step = None  # a resumed checkpoint's W&B step (log.wandb_resume=rewind)

    # -- setup helpers -------------------------------------------------------------------
    def _per_process_batch(self) -> int:
        t = self.cfg.train
        if t.global_batch_size is None:
            return t.batch_size
        if t.global_batch_size % self.world:
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} does not divide by {self.world} processes")
        return t.global_batch_size // self.world

    def _compile_mode(self) -> str | None:
        """The torch.compile mode, None for eager; refuses the modes known to break under DDP."""
        m = self.cfg.model
        if not (m.compile if m.compile is not None else self.device.type == "cuda"):
            return None
        if self.world > 1 and m.compile_mode in ("reduce-overhead", "max-autotune"):
            raise ConfigError(
                f"model.compile_mode={m.compile_mode} with {self.world} processes: its CUDA graphs split at DDP's "
                f"buckets and are overwritten by the next replay; use default or max-autotune-no-cudagraphs")
        return m.compile_mode

    def _reset_window(self):
        self._window_start = self.state.step
        self._data_wait = 0.0
        self._side_time = 0.0  # eval, checkpoints, pictures: not part of training throughput
        self._t0 = time.perf_counter()

    def maybe_resume(self, path: Path | None) -> None:
        """Loads a checkpoint that `choose_start` verified (None: a fresh start)."""
        if path is None:
            return
        saved = ckpt.load_checkpoint(self.accelerator, path, self.raw_model, self.optimizer)
        ckpt.match_state_layouts(self.step.raw_optimizer)  # e.g. a CPU checkpoint resumed channels_last
        self.step.bind_lr()  # the loaded param groups brought their own lr values
        # fields a checkpoint of an older version lacks keep their defaults
        self.state = TrainState(**{f.name: saved[f.name] for f in dataclasses.fields(TrainState) if f.name in saved})
        self.state.resumes += 1
        self.step.meters[meters.CONSECUTIVE] = self.state.bad_steps
        if saved.get("world_size") != self.world or saved.get("batch_size") != self.batch_size \
                or self.state.batch_in_epoch >= self.steps_per_epoch:
            # a different split of the data (or an older checkpoint written at an epoch's last
            # batch): continue from the next epoch boundary
            self.state.epoch += self.state.batch_in_epoch > 0
            self.state.batch_in_epoch = 0
        self._last_ckpt_step = self.state.step
        self._wandb_step = saved.get("wandb_step")
        self._reset_window()

    def finished(self) -> bool:
        """The run resumed at its last step with its final weights written: nothing is left to do."""
        return self.state.step >= self.total_steps and (self.run_dir / ckpt.WEIGHTS).is_file()

    # -- the loop ------------------------------------------------------------------------
    def fit(self, checkpoint: Path | None = None) -> int:
        self.maybe_resume(checkpoint)
        if self.finished():  # the same command run again: it says so and writes nothing
            self.hooks.say(
                f"the run in {self.run_dir} already reached its last step ({self.state.step} of {self.total_steps}) "
                f"and wrote its weights: nothing to do (a larger train.max_steps or train.epochs trains on from "
                f"{checkpoint.name}; train.overwrite=true starts over)")
            self.hooks.close()
            self.close_loaders()
            return 0
        self.hooks.on_train_start(self.config_yaml, self.describe(), wandb_step=self._wandb_step)
        if checkpoint is not None:
            self.hooks.say(f"resumed from {checkpoint} at step {self.state.step} (epoch {self.state.epoch})")
        stop = StopSignal()
        try:
            while self.state.step < self.total_steps and not stop.agreed:
                self.run_epoch(stop)
            if stop.agreed:
                self.checkpoint()
                self.hooks.say(f"stopped by signal {stop.agreed} at step {self.state.step}; "
                               f"checkpoint saved; continue with train.resume=auto")
                self.hooks.close(stopped_by=stop.agreed)
                return 128 + stop.agreed
            self.finish()
            return 0
        except BaseException:
            self.hooks.close(failed=True)  # the W&B run is finished (as failed), files flushed
            raise
        finally:
            stop.restore()
            self.profiler.close(self.state.step)
            self.close_loaders()

    def close_loaders(self) -> None:
        """Releases the loaders' pipelines while CUDA is up (DALI can abort in its teardown)."""
        for loader in (self.train_loader, self.val_loader):
            loader.close()

    def run_epoch(self, stop: StopSignal) -> None:
        epoch = self.state.epoch
        batches = self.train_loader.epoch(epoch, skip=self.state.batch_in_epoch)
        try:
            while self.state.epoch == epoch and self.state.step < self.total_steps and not stop.agreed:
                t_wait = time.perf_counter()
                batch = next(batches, None)
                self._data_wait += time.perf_counter() - t_wait
                if batch is None:  # every loader yields steps_per_epoch batches; never here
                    raise RuntimeError(f"the train loader ended epoch {epoch} after {self.state.batch_in_epoch} "
                                       f"of {self.steps_per_epoch} batches")
                self.train_step(batch[0])
                self.maybe_sync(stop)
                self.side_work()
        finally:
            batches.close()

    def side_work(self) -> None:
        """What follows a step, in an order a resume relies on: the epoch's end and the
        evaluation of a step come before its checkpoint, so a run resumed from that checkpoint
        neither evaluates the step again nor misses it."""
        t_side = time.perf_counter()
        if self.state.batch_in_epoch == self.steps_per_epoch:
            self.end_epoch()
        self.maybe_eval()
        self.maybe_checkpoint()
        self.hooks.maybe_images(self.state.step, self.raw_model)
        self._side_time += time.perf_counter() - t_side

    def train_step(self, images: torch.Tensor) -> None:
        """One optimizer step; never waits for the device (the entry the benchmarks time)."""
        step = self.state.step
        self.profiler.before_step(step)
        self.step(images, lr_at(step, self.total_steps, self.cfg.optim), self.beta_at(step))
        self.state.step += 1
        self.state.batch_in_epoch += 1
        self.profiler.after_step(self.state.step)

    def maybe_sync(self, stop: StopSignal) -> None:
        """Every log.log_every steps (and at the last): the host reads the device once.
        The window's meters are averaged over ranks and logged; the non-finite counters and
        the stop signal are agreed (max over ranks), so every rank stops at this same step;
        train.max_bad_steps is enforced here, i.e. up to log_every steps late."""
        if self.world == 1:
            stop.agreed = stop.received  # nothing to agree on: stop at once
        if self.state.step % self.cfg.log.log_every and self.state.step != self.total_steps:
            return
        window = self.step.take_meters()
        sums = self.accelerator.reduce(window[:meters.GOOD + 1], reduction="mean")  # collective: all ranks
        flags = torch.cat([window[meters.SKIPPED:], window.new_tensor([stop.received])])
        flags = self.accelerator.reduce(flags, reduction="max")  # collective: all ranks
        loss, recon, kl, kl_objective, grad_norm, good, skipped, consecutive, max_consecutive, signum = \
            torch.cat([sums, flags]).tolist()  # SYNC: the only host read between sync points
        stop.agreed = int(signum)
        self.state.sigma_recon += recon
        self.state.sigma_steps += good
        self.state.bad_steps = int(consecutive)
        self.state.skipped_steps += int(skipped)
        if good or skipped:
            n = max(good, 1)
            self.log_window(loss / n, recon / n, kl / n, kl_objective / n, grad_norm / n)
        if max_consecutive >= self.cfg.train.max_bad_steps:
            raise DivergedError(
                f"{int(max_consecutive)} non-finite steps in a row by step {self.state.step}: training diverged "
                f"(lower optim.lr, set optim.grad_clip, or use fp32/bf16 instead of fp16)")

    def log_window(self, loss: float, recon: float, kl: float, kl_objective: float, grad_norm: float) -> None:
        elapsed = time.perf_counter() - self._t0 - self._side_time
        steps = self.state.step - self._window_start
        img_per_s = steps * self.batch_size * self.world / elapsed if elapsed > 0 else 0.0
        last = self.state.step - 1
        row = {
            # kl is the real KL (elbo's); loss is the objective, whose KL free bits may clamp
            "step": self.state.step, "epoch": self.state.epoch, "loss": loss, "recon": recon, "kl": kl,
            "elbo": -(recon + kl), "beta": self.beta_at(last), "lr": lr_at(last, self.total_steps, self.cfg.optim),
            "grad_norm": grad_norm, "img_per_s": img_per_s, "img_per_s_per_process": img_per_s / self.world,
            "data_wait": self._data_wait / elapsed if elapsed > 0 else 0.0,
            "skipped_steps": self.state.skipped_steps, "total_steps": self.total_steps,
            "progress": self.state.step / self.total_steps,
            # at this window's pace (side work excluded), which is what the rest will run at
            "eta_s": (self.total_steps - self.state.step) * elapsed / max(steps, 1),
            # model FLOP/s over all processes; mfu per device against its dense peak
            "tflop_per_s": img_per_s * self.flops_per_image / 1e12,
        }
        if self.cfg.loss.free_bits > 0:
            row["kl_objective"] = kl_objective  # the KL with each dim clamped at loss.free_bits
        if self.peak_flops:
            row["mfu"] = img_per_s / self.world * self.flops_per_image / self.peak_flops
        if self.device.type == "cuda":
            row["gpu_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self.hooks.log_scalars(row)
        self._reset_window()

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
        self.evaluate()

    def finish(self) -> None:
        self.evaluate()
        self.checkpoint()
        self.hooks.maybe_images(self.state.step, self.raw_model, final=True)
        if self.accelerator.is_main_process:
            ckpt.save_weights(self.raw_model, self.run_dir / ckpt.WEIGHTS)
        self.accelerator.wait_for_everyone()
        self.hooks.close(weights=self.run_dir / ckpt.WEIGHTS)

    def _window_recon(self) -> tuple[float, float]:
        """(recon sum, good steps) of the current, unsynced window, averaged over ranks as at a
        sync point. Collective: evaluations and checkpoints, where every rank is."""
        window = self.accelerator.reduce(self.step.meters[[meters.RECON, meters.GOOD]], reduction="mean")
        recon, good = window.tolist()  # SYNC: evaluations and checkpoints only
        return recon, good

    def take_sigma(self) -> float | None:
        """The decoder's sigma for bits/dim: learned (loss.recon=gaussian), or for the seed's MSE
        the maximum-likelihood shared sigma on training images (Rybkin et al. 2021): the root
        of their mean squared error per subpixel over the train steps since the last evaluation
        (all ranks', so every rank scores with the same sigma); the next one counts the steps
        after this call. Collective."""
        model = self.raw_model
        if model.log_sigma is not None:
            return float(model.log_sigma.detach().exp())  # SYNC: evaluation only
        window_recon, window_good = self._window_recon()
        recon, good = self.state.sigma_recon + window_recon, self.state.sigma_steps + window_good
        if good > 0:
            pixels = model.cfg.in_channels * model.cfg.image_size**2
            mean = recon / good
            self.state.sigma = math.sqrt(mean / pixels if self.cfg.loss.recon == "sum" else mean)
            # the next sigma counts the steps after this one; the window's part so far is
            # already counted, and the next sync point adds the whole window
            self.state.sigma_recon, self.state.sigma_steps = -window_recon, -window_good
        return self.state.sigma  # no train step since the last evaluation: the sigma it used

    @torch.no_grad()
    def evaluate(self) -> dict | None:
        """Val metrics over every val sample once (each rank its own part), summed over ranks:
        the training objective, and the ELBO as a discretized likelihood in bits/dim."""
        if self.state.last_eval_step == self.state.step:
            return None
        self.state.last_eval_step = self.state.step
        model = self.raw_model  # eager and unwrapped: ranks may run different batch counts here
        model.eval()
        sigma = self.take_sigma()
        # recon (objective), kl, sq_err(decode(mu)), log p(x|z) discretized under sigma, images
        sums = torch.zeros(5, device=self.device, dtype=torch.float64)
        for x, _ in self.val_loader.epoch(0):  # train.eval_images caps it (the loader's count)
            x = unit_float(x)
            with self.accelerator.autocast():
                x_hat, mu, logvar = model(x)
                x_mean = model.decode(mu)
            n = x.shape[0]
            log_px = discretized_gaussian_log_likelihood(x, x_hat, sigma).sum() if sigma else x.new_zeros(())
            sums += torch.stack([
                recon_loss(x_hat, x, self.cfg.loss.recon, model.log_sigma).double() * n,
                kl_divergence(mu, logvar).double() * n, (x_mean.float() - x).pow(2).sum().double(),
                log_px.double(), sums.new_full((), n),  # a fill kernel: no blocking host-to-device copy
            ])
        model.train()
        sums = self.accelerator.reduce(sums, reduction="sum")  # collective: all ranks
        recon, kl, sq_err, log_px, count = sums.tolist()  # SYNC
        if count == 0:
            return None
        pixels = model.cfg.in_channels * model.cfg.image_size**2
        row = {
            "split": "val", "step": self.state.step, "epoch": self.state.epoch, "loss": (recon + kl) / count,
            "recon": recon / count, "kl": kl / count, "psnr": psnr(sq_err / (count * pixels)), "images": int(count),
        }
        if sigma:  # the ELBO of 8-bit images under the decoder's sigma, in nats and in bits/dim
            row.update(elbo=(log_px - kl) / count, bpd=bits_per_dim((kl - log_px) / count, pixels), sigma=sigma)
        if self.device.type == "cuda":  # the whole device's use (DALI's buffers too), not only PyTorch's
            free, total = torch.cuda.mem_get_info(self.device)
            row["gpu_mem_used_gib"] = (total - free) / 2**30
        self.hooks.log_eval(row)
        return row

    def checkpoint(self) -> None:
        if self._last_ckpt_step == self.state.step:
            return
        self._last_ckpt_step = self.state.step
        m = self.step.meters  # the counters up to this very step, not the last sync point
        skipped, consecutive = m[meters.SKIPPED:meters.CONSECUTIVE + 1].tolist()  # SYNC: checkpoints only
        window_recon, window_good = self._window_recon()  # collective: every rank checkpoints
        state = dict(dataclasses.asdict(self.state), batch_size=self.batch_size, bad_steps=int(consecutive),
                     skipped_steps=self.state.skipped_steps + int(skipped),
                     sigma_recon=self.state.sigma_recon + window_recon,
                     sigma_steps=self.state.sigma_steps + window_good, **self.hooks.checkpoint_state())
        path = ckpt.save_checkpoint(self.accelerator, self.run_dir, self.raw_model, self.optimizer, state,
                                    self.config_yaml, self.cfg.train.keep_last)
        self.hooks.on_checkpoint(path)

    def _loader_name(self) -> str:
        return f"{self.cache}-cache" if self.cache != "none" else resolve_loader_kind(self.cfg.data.loader)

    def describe(self) -> dict:
        acc = self.accelerator
        return {
            "processes": self.world, "device": str(self.device), "mixed_precision": acc.mixed_precision,
            "compile": self.compile_mode or "no", "channels_last": self.channels_last,
            "batch_per_process": self.batch_size, "global_batch": self.batch_size * self.world,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "loader": self._loader_name(), "start_step": self.state.step, "data": self.data_choice,
            "resumes": self.state.resumes,
        }


def print_once(accelerator: Accelerator, text: str) -> None:
    """A line from the main process only (accelerator.print prints once per node)."""
    if accelerator.is_main_process:
        print(text, flush=True)


def _rank_zero_decides(accelerator: Accelerator, decide):
    """Runs `decide` on rank 0 and hands its result (or its UserError) to every rank."""
    result = error = None
    if accelerator.is_main_process:
        try:
            result = decide()
        except UserError as e:
            error = str(e)
    if accelerator.num_processes > 1:
        result, error = broadcast_object_list([result, error])
    if error is not None:
        raise SharedError(error)
    return result


def train(cfg: Config) -> int:
    cfg.train.out_dir = expand_out_dir(cfg.train.out_dir)
    accelerator = make_accelerator(cfg)
    run_dir = Path(cfg.train.out_dir)
    lock = RunFolderLock(run_dir)  # rank 0 holds it for the whole run

    def claim_folder():
        lock.acquire()
        start = choose_start(run_dir, cfg.train.resume, cfg.train.overwrite)
        record_slurm_job(run_dir)
        return start

    try:
        if cfg.data.verify:  # before the run folder is touched: damaged shards change nothing there
            print_once(accelerator, _rank_zero_decides(accelerator, lambda: verify_shards(cfg.data.shards)))
        start = _rank_zero_decides(accelerator, claim_folder)
        if start.moved_to is not None:
            print_once(accelerator, f"moved the previous run in {run_dir} to {start.moved_to}")
        for note in start.notes:
            print_once(accelerator, f"vae-dist: {note}")
        if start.set_aside is not None:
            print_once(accelerator, f"set aside what lay beyond {start.checkpoint.name} (later checkpoints, metrics "
                                    f"rows) in {start.set_aside}: this run continues from {start.checkpoint.name}")
        code = Trainer(cfg, accelerator).fit(start.checkpoint)
        lock.release()
        # nobody exits before rank 0 has let go of the folder (srun --kill-on-bad-exit ends
        # the other ranks as soon as one exits with a signal's code)
        accelerator.wait_for_everyone()
    finally:
        lock.release()
    sys.stdout.flush()
    return code
