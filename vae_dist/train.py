"""The Trainer: Accelerate DDP + mixed precision + torch.compile over the shard loaders.

    vae-dist train --train.max_steps=1000                       # one process
    accelerate launch --config_file accelerate_config.yaml -m vae_dist train ...

The Trainer builds the run's parts once and runs the loop; each part owns its work and its
timing: the step (step.py), the metrics window and its sync point (metrics.py), evaluation
(evaluation.py), checkpoints (train_state.py), and every rank-zero side effect (hooks.py).
All ranks run the same steps and enter the same collectives; only rank 0 writes. The host
reads the device only at sync points (every `log.log_every` steps, marked SYNC).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from vae_dist.checkpoint import WEIGHTS, save_weights
from vae_dist.config import Config, batch_setting, dump_yaml, per_process_batch, vae_config
from vae_dist.data.fetch import FetchOptions
from vae_dist.data.loaders import (
    adopt_shard_size,
    build_train_and_val,
    cache_fill,
    check_model_fits_shards,
    choose_cache,
    fit_model_to_shards,
    resolve_decode,
    resolve_loader_kind,
    train_shuffle,
    verify_shards,
)
from vae_dist.data.partition import check_batch_fits
from vae_dist.data.shards import ShardSet
from vae_dist.distributed import check_comm_hook, check_ddp_knobs, make_accelerator, print_once, rank_zero_decides
from vae_dist.errors import SharedError, UserError, counted, report
from vae_dist.evaluation import Evaluator
from vae_dist.flops import peak_flops, train_flops_per_image
from vae_dist.hooks import make_hooks
from vae_dist.losses import make_kl_schedule
from vae_dist.metrics import MetricsWindow
from vae_dist.model import VAE
from vae_dist.optim import lr_at, make_optimizer
from vae_dist.preemption import StopSignal
from vae_dist.profiling import StepRangeProfiler
from vae_dist.run_folder import RunFolderLock, choose_start, expand_out_dir, record_slurm_job
from vae_dist.step import GraphedStep, TrainStep, check_cuda_graph, compile_mode_for
from vae_dist.train_state import TrainCheckpoints, TrainState
from vae_dist.watchdog import RankWatchdog


class Trainer:
    """Setup, then `fit`: the loop, which hands each thing that follows a step to its part."""

    def __init__(self, cfg: Config, accelerator: Accelerator | None = None, shards: ShardSet | None = None,
                 lock: RunFolderLock | None = None):
        self.cfg = cfg
        self.accelerator = acc = accelerator or make_accelerator(cfg)
        self.device, self.world, self.rank = acc.device, acc.num_processes, acc.process_index
        self.run_dir = Path(cfg.train.out_dir)
        self.lock = lock or RunFolderLock(self.run_dir)  # rank 0's, held by `train`: it tells a lost folder
        self.shards = shards or ShardSet.open(cfg.data.shards, FetchOptions.of(cfg.data))  # the only read of manifest.json
        self.data_identity = data_identity(self.shards, cfg.data)  # what each checkpoint records it was trained on
        # a forward sees a micro-batch; an optimizer step takes grad_accum_steps of them per process
        self.micro_batch, self.accum_steps = per_process_batch(cfg.train, self.world), cfg.train.grad_accum_steps
        self.batch_size = self.micro_batch * self.accum_steps  # per process and optimizer step: the loaders' batch
        self.compile_mode = compile_mode_for(cfg.model, self.device, self.world)
        fit_model_to_shards(cfg.model, self.shards)  # model.image_size: the shards' unless set

        self.channels_last = cfg.model.channels_last if cfg.model.channels_last is not None else self.device.type == "cuda"
        model = build_model(cfg, self.device, self.rank, self.channels_last)
        optimizer = make_optimizer(model, cfg.optim)

        self.cache, self.data_choice = choose_cache(self.shards, cfg.data, self.device)
        self.train_loader, self.val_loader = build_train_and_val(
            self.shards, cfg.data, self.batch_size, rank=self.rank, world=self.world, device=self.device,
            seed=cfg.train.seed, cache=self.cache, val_limit=cfg.train.eval_images, val_batch_size=self.micro_batch)
        self.steps_per_epoch = self.train_loader.steps_per_epoch
        self.total_steps = cfg.train.max_steps or cfg.train.epochs * self.steps_per_epoch
        self.lr_at = functools.partial(lr_at, total_steps=self.total_steps, optim=cfg.optim)
        self.beta_at = make_kl_schedule(cfg.loss, self.total_steps)

        self.model, self.optimizer = acc.prepare(model, optimizer)  # DDP wrap
        self.raw_model: VAE = acc.unwrap_model(self.model)
        self.step = TrainStep(acc, self.model, self.optimizer, cfg.loss, cfg.optim.grad_clip, self.compile_mode,
                              self.channels_last, accum_steps=self.accum_steps)
        check_cuda_graph(cfg.train.cuda_graph, self.device, self.world, self.accum_steps, acc.mixed_precision,
                         self.compile_mode)
        if cfg.train.cuda_graph:
            self.step = GraphedStep(self.step)  # captured at the first step, after a resume
        self.state = TrainState()
        self.watchdog = RankWatchdog(self.rank, self.world, cfg.train.collective_timeout_s, self.run_dir,
                                     before_exit=self.lock.release)
        self.config_yaml = dump_yaml(cfg)
        self.hooks = make_hooks(acc, cfg, self.run_dir, self.val_loader, self.shards.class_names, self.lock.lost)
        self.window = MetricsWindow(
            acc, self.step, self.hooks, log_every=cfg.log.log_every, batch_size=self.batch_size,
            total_steps=self.total_steps, lr_at=self.lr_at, beta_at=self.beta_at, max_bad_steps=cfg.train.max_bad_steps,
            flops_per_image=train_flops_per_image(self.raw_model.cfg), free_bits=cfg.loss.free_bits,
            peak_flops=peak_flops(self.device, acc.mixed_precision, cfg.log.peak_tflops))
        self.evaluator = Evaluator(acc, self.raw_model, self.val_loader, cfg.loss, self.step,
                                   every=cfg.train.eval_every, at_epoch_end=cfg.train.eval_at_epoch_end,
                                   hooks=self.hooks, progress=self.watchdog.progress)
        self.checkpoints = TrainCheckpoints(acc, self.run_dir, self.raw_model, self.optimizer, self.step,
                                            self.config_yaml, batch_size=self.batch_size, hooks=self.hooks,
                                            data=self.data_identity, max_bad_steps=cfg.train.max_bad_steps,
                                            every=cfg.train.checkpoint_every, keep_last=cfg.train.keep_last)
        self.profiler = StepRangeProfiler(cfg.train.profile_steps, self.run_dir / "profile", self.device, self.rank)
        self.wandb_step = None  # a resumed checkpoint's W&B step (log.wandb_resume=rewind)

    # -- the loop ------------------------------------------------------------------------
    def fit(self, checkpoint: Path | None = None) -> int:
        """Trains from `checkpoint` (verified by `choose_start`; None: step 0) to the last step or
        an agreed stop signal; returns the process's exit code."""
        self.resume(checkpoint)
        if self.state.step >= self.total_steps and (self.run_dir / WEIGHTS).is_file():
            return self.nothing_left(checkpoint)  # the same command run again: it says so and writes nothing
        self.hooks.on_train_start(self.config_yaml, self.describe(), wandb_step=self.wandb_step)
        if (warning := self.short_epoch_warning()) is not None:
            self.hooks.say(warning)
        if checkpoint is not None:
            self.hooks.say(f"resumed from {checkpoint} at step {self.state.step} (epoch {self.state.epoch})"
                           + self.checkpoints.resume_note)
        stop = StopSignal()
        self.watchdog.start(self.state.step)
        try:
            while self.state.step < self.total_steps and not stop.agreed:
                self.run_epoch(stop)
            return self.stopped(stop.agreed) if stop.agreed else self.finish()
        except BaseException as e:
            if isinstance(e, UserError):
                report(e)  # first: the other ranks may be gone already, and the launcher ends this one next
            self.watchdog.close()  # what follows is rank 0's alone: no rank waits for another now
            self.hooks.close(failed=True)  # the W&B run is finished (as failed), files flushed
            raise
        finally:
            self.watchdog.close()
            stop.restore()
            self.profiler.close(self.state.step)
            self.close_loaders()

    def run_epoch(self, stop: StopSignal) -> None:
        epoch = self.state.epoch
        batches = self.train_loader.epoch(epoch, skip=self.state.batch_in_epoch)
        try:
            while self.state.epoch == epoch and self.state.step < self.total_steps and not stop.agreed:
                with self.window.data_wait:
                    batch = next(batches, None)
                if batch is None:  # every loader yields steps_per_epoch batches; never here
                    raise RuntimeError(f"the train loader ended epoch {epoch} after {self.state.batch_in_epoch} "
                                       f"of {self.steps_per_epoch} batches")
                self.train_step(batch[0])
                self.maybe_sync(stop)
                with self.window.side_work:  # not part of training throughput
                    self.side_work()
        finally:
            batches.close()

    def train_step(self, images: torch.Tensor) -> None:
        """One optimizer step; never waits for the device (the entry the benchmarks time)."""
        step = self.state.step
        self.profiler.before_step(step)
        self.step(images, self.lr_at(step), self.beta_at(step))
        self.state.step += 1
        self.state.batch_in_epoch += 1
        self.watchdog.progress(self.state.step)
        self.profiler.after_step(self.state.step)

    def maybe_sync(self, stop: StopSignal) -> None:
        """The host reads the device only at the window's sync points; there the ranks agree on
        a stop signal, so every rank stops after the same step."""
        if self.world == 1:
            stop.agreed = stop.received  # nothing to agree on: stop at once
        if self.window.due(self.state.step):
            lost = self.lock.lost()  # rank 0's look at the run folder (None elsewhere)
            m = self.window.sync(self.state, stop.received, folder_lost=lost is not None)  # SYNC, collective
            if m.folder_lost:
                self.stop_for_lost_folder(lost)
            stop.agreed = m.stop_signal

    def side_work(self) -> None:
        """What follows a step, in an order a resume relies on: the epoch's end and the
        evaluation of a step come before its checkpoint, so a run resumed from that checkpoint
        neither evaluates the step again nor misses it."""
        epoch_end = self.state.batch_in_epoch == self.steps_per_epoch
        if epoch_end:
            self.state.epoch += 1
            self.state.batch_in_epoch = 0
        self.maybe_eval(epoch_end)
        self.maybe_checkpoint()
        self.hooks.maybe_images(self.state.step, self.raw_model)

    def maybe_eval(self, epoch_end: bool = False) -> None:
        if self.evaluator.due(self.state.step, epoch_end):
            self.evaluator.evaluate(self.state)

    def maybe_checkpoint(self) -> None:
        if self.checkpoints.due(self.state.step):
            self.save_checkpoint()

    def save_checkpoint(self) -> bool:
        """A checkpoint, into this run's own folder only: one gone, replaced or read-only since
        the last sync point stops the run instead (the check is rank 0's, shared by all)."""
        lost = rank_zero_decides(self.accelerator, self.lock.lost)  # collective
        if lost is not None:
            self.stop_for_lost_folder(lost)
        return self.checkpoints.save(self.state)

    def stop_for_lost_folder(self, lost: str | None) -> None:
        """Every rank alike; rank 0 (which knows why) says it. Nothing more is written anywhere:
        not into a new folder at the old path, nor into the files the old one held."""
        self.hooks.detach()
        raise SharedError(f"{lost or 'the run folder was lost'} (at step {self.state.step}): the run stops and "
                          f"writes nothing more; start it again in a folder of its own")

    # -- how a run starts and ends --------------------------------------------------------
    def resume(self, checkpoint: Path | None) -> None:
        if checkpoint is not None:
            self.state, self.wandb_step = self.checkpoints.load(checkpoint, steps_per_epoch=self.steps_per_epoch)
            self.window.restart(self.state.step)

    def nothing_left(self, checkpoint: Path) -> int:
        self.hooks.say(f"the run in {self.run_dir} already reached its last step ({self.state.step} of "
                       f"{self.total_steps}) and wrote its weights: nothing to do (a larger train.max_steps or "
                       f"train.epochs trains on from {checkpoint.name}; train.overwrite=true starts over)")
        self.hooks.close()
        self.close_loaders()
        return 0

    def stopped(self, signum: int) -> int:
        saved = "checkpoint saved" if self.save_checkpoint() else "no checkpoint (non-finite steps)"
        self.watchdog.close()  # the last collective is behind
        self.hooks.say(f"stopped by signal {signum} at step {self.state.step}; {saved}; "
                       f"continue with train.resume=auto")
        self.hooks.close(stopped_by=signum)
        return 128 + signum

    def finish(self) -> int:
        self.evaluator.evaluate(self.state)
        self.save_checkpoint()
        self.hooks.maybe_images(self.state.step, self.raw_model, final=True)
        if self.accelerator.is_main_process:
            save_weights(self.raw_model, self.run_dir / WEIGHTS)
        self.accelerator.wait_for_everyone()
        self.watchdog.close()  # the last collective is behind: the W&B finish below is rank 0's alone
        self.hooks.close(weights=self.run_dir / WEIGHTS)
        return 0

    def close_loaders(self) -> None:
        """Releases the loaders' pipelines while CUDA is up (DALI can abort in its teardown)."""
        for loader in (self.train_loader, self.val_loader):
            loader.close()

    def short_epoch_warning(self) -> str | None:
        """Said under the start line where an epoch is shorter than the log interval: a train row
        falls in only some epochs (a small data set: the loss curves get a point or two), while
        every epoch end evaluates. None where that cannot happen (a run of one epoch or less)."""
        epoch, every = self.steps_per_epoch, self.cfg.log.log_every
        if epoch >= every or self.total_steps <= epoch:
            return None
        text = (f"vae-dist: warning: an epoch is {counted(epoch, 'step')}, fewer than log.log_every={every}: most "
                f"epochs write no train row (log.log_every={epoch} writes one an epoch)")
        if self.cfg.train.eval_at_epoch_end:
            text += (f"; each of the {self.total_steps // epoch} epoch ends is evaluated "
                     f"(train.eval_at_epoch_end=false leaves train.eval_every and the last step)")
        return text

    def describe(self) -> dict:
        acc = self.accelerator
        loader = f"{self.cache}-cache" if self.cache != "none" else resolve_loader_kind(self.cfg.data.loader)
        fill = {"cache_fill": cache_fill(self.cfg.data)} if self.cache != "none" else {}
        return {
            "processes": self.world, "device": str(self.device), "mixed_precision": acc.mixed_precision,
            "compile": self.compile_mode or "no", "cuda_graph": self.cfg.train.cuda_graph, "channels_last": self.channels_last,
            "batch_per_process": self.micro_batch, "grad_accum_steps": self.accum_steps,
            "global_batch": self.batch_size * self.world, **self.describe_ddp(),
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
            "loader": loader, **fill, "order": train_shuffle(self.shards, self.cfg.data)[0],
            "start_step": self.state.step, "data": self.data_choice, "resumes": self.state.resumes,
            "data_digest": self.data_identity["digest"],
        }

    def describe_ddp(self) -> dict:
        """How gradients cross the processes (nothing to say for one process: no DDP)."""
        t = self.cfg.train
        if self.world == 1:
            return {}
        return {"comm_hook": t.ddp_comm_hook, "bucket_mb": t.ddp_bucket_mb, "bucket_view": t.ddp_bucket_view,
                "static_graph": t.ddp_static_graph}


def data_identity(shards: ShardSet, data_cfg) -> dict:
    """The shards' identity and the train order read from them: a resume continues both."""
    mode = train_shuffle(shards, data_cfg)[0]
    return {**shards.identity(), "order": mode if mode == "global" else f"{mode}/{data_cfg.shuffle_block}"}


def build_model(cfg: Config, device: torch.device, rank: int, channels_last: bool) -> VAE:
    """The same initial weights on every rank (DDP broadcasts them too), then a per-rank torch
    RNG stream for the reparameterization noise."""
    set_seed(cfg.train.seed)
    model = VAE(vae_config(cfg.model)).to(device, memory_format=torch.channels_last if channels_last
                                          else torch.preserve_format)
    torch.manual_seed(cfg.train.seed * 1000 + rank)
    return model


def refuse_early(cfg: Config, shards: ShardSet, accelerator: Accelerator) -> None:
    """What the Trainer's setup would refuse, checked before the run folder is touched (once,
    on rank 0): a run that cannot start leaves nothing behind and says why in one line."""
    device, world = accelerator.device, accelerator.num_processes
    batch = per_process_batch(cfg.train, world) * cfg.train.grad_accum_steps  # per process and optimizer step
    check_model_fits_shards(cfg.model, shards)  # first: the wrong image size is the cause of what follows
    check_batch_fits(shards.count("train"), batch, world, batch_setting(cfg.train, world))
    check_ddp_knobs(cfg.train)
    check_cuda_graph(cfg.train.cuda_graph, device, world, cfg.train.grad_accum_steps, accelerator.mixed_precision,
                     compile_mode_for(cfg.model, device, world))
    resolve_decode(cfg.data.decode, device)
    cache, _ = choose_cache(shards, cfg.data, device)  # refuses data.cache=gpu without CUDA
    # streaming reads through a loader package; a cache fills through DALI or the project's own reader
    resolve_loader_kind(cfg.data.loader) if cache == "none" else cache_fill(cfg.data)


def train(cfg: Config) -> int:
    cfg.train.out_dir = expand_out_dir(cfg.train.out_dir)
    accelerator = make_accelerator(cfg)
    run_dir = Path(cfg.train.out_dir)
    lock = RunFolderLock(run_dir)  # rank 0 holds it for the whole run

    def claim_folder():
        lock.acquire()
        start = choose_start(run_dir, cfg.train.resume, cfg.train.overwrite, model=vae_config(cfg.model),
                             data=data_identity(shards, cfg.data), other_data_ok=cfg.train.resume_other_data)
        record_slurm_job(run_dir)
        return start

    try:
        # rank 0 reads the shard folder before the run folder is touched, and every rank gets that
        # same ShardSet: one read of manifest.json per run, and a bad folder is one line
        shards = rank_zero_decides(accelerator, lambda: ShardSet.open(cfg.data.shards, FetchOptions.of(cfg.data)))
        adopt_shard_size(cfg.model, shards)  # every rank alike; a set value is checked in refuse_early
        rank_zero_decides(accelerator, lambda: refuse_early(cfg, shards, accelerator))
        check_comm_hook(accelerator, cfg.train.ddp_comm_hook)  # collective: every rank probes the backend
        if cfg.data.verify:  # damaged shards change nothing in the run folder
            print_once(accelerator, rank_zero_decides(accelerator, lambda: verify_shards(shards)))
        start = rank_zero_decides(accelerator, claim_folder)
        for line in start.report(run_dir):
            print_once(accelerator, line)
        code = Trainer(cfg, accelerator, shards, lock).fit(start.checkpoint)
        lock.release()
        # nobody exits before rank 0 has let go of the folder (srun --kill-on-bad-exit ends
        # the other ranks as soon as one exits with a signal's code)
        accelerator.wait_for_everyone()
    except UserError as e:
        report(e)  # before the folder's release: see Trainer.fit
        raise
    finally:
        lock.release()
    sys.stdout.flush()
    return code
