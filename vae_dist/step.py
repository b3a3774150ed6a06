"""The training step: forward, loss, KL, backward, clip, update. No host-device sync.

On a GPU the seed VAE is bound by launches and syncs, not arithmetic, so the host must
never wait for the device inside a step:
- lr and beta are device tensors, filled in place each step: changing them neither
  recompiles the compiled forward nor reads the device.
- A non-finite gradient is skipped on the device: fused Adam's `found_inf` input leaves the
  weights, moments and step count untouched (the same path the fp16 GradScaler uses).
- The meters (loss sums, good/skipped steps, consecutive non-finite steps) are device
  tensors; they are read only at sync points (`metrics.read_window`).
The forward and the loss terms are one `torch.compile`d function (under DDP it breaks at
DDP's forward, whose inner module is compiled with DDP's bucket-aware optimizer); the tail
(gradient norm, finite check, clip, meters) is a second one, so the ~20 tiny kernels it
launches eagerly become a few. Both compile with `dynamic=False`: a training run's shapes
never change, and a dynamic-shape graph would be slower.
Gradient accumulation (train.grad_accum_steps = k): the step's batch is split into k
micro-batches, each forward + backward on its own (activations for one micro-batch at a time),
the loss divided by k so the summed gradients are those of the whole batch; DDP all-reduces
only the last micro-batch's backward (Accelerate's no_sync on the others), then one update.
The loaders, the schedules and the data position therefore count optimizer steps, as without.
At the seed's batch 64 the step is host-bound, so it calls the raw optimizer: accelerate's
wrapper spends 200-300 us of host time per step + zero_grad (find_spec, inspect.signature;
measured on the CPU, docs/benchmarks.md) and is needed only for the fp16 GradScaler.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from vae_dist.data import unit_float
from vae_dist.errors import ConfigError
from vae_dist.losses import kl_terms, recon_loss


class _NoCudaRuntimeNotice(logging.Filter):
    """Drops cpp_extension's "No CUDA runtime is found, using CUDA_HOME=..." warning, which
    torch.compile's C++ backend prints on a CPU machine that has a CUDA toolkit but no GPU: the
    CPU build it means is the one intended, and there is nothing a user can do about it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaRuntimeNotice())

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
# meter slots: sums over good steps of loss, recon, kl (the real KL), the KL the objective
# penalizes (clamped by loss.free_bits), grad_norm; then good steps, skipped steps in the
# window, consecutive non-finite steps now, their maximum in the window
LOSS, RECON, KL, KL_OBJECTIVE, GRAD_NORM, GOOD, SKIPPED, CONSECUTIVE, MAX_CONSECUTIVE = range(9)


def compile_mode_for(model_cfg, device: torch.device, world: int) -> str | None:
    """The torch.compile mode (None: eager; model.compile unset compiles on CUDA); refuses the
    modes known to break under DDP."""
    if not (model_cfg.compile if model_cfg.compile is not None else device.type == "cuda"):
        return None
    if world > 1 and model_cfg.compile_mode in ("reduce-overhead", "max-autotune"):
        raise ConfigError(
            f"model.compile_mode={model_cfg.compile_mode} with {world} processes: its CUDA graphs split at DDP's "
            f"buckets and are overwritten by the next replay; use default or max-autotune-no-cudagraphs")
    return model_cfg.compile_mode


class TrainStep:
    def __init__(self, accelerator, model, optimizer, loss_cfg, grad_clip: float, compile_mode: str | None,
                 channels_last: bool, accum_steps: int = 1):
        self.accelerator, self.model, self.optimizer = accelerator, model, optimizer
        self.accum_steps = accum_steps
        self.raw_optimizer = getattr(optimizer, "optimizer", optimizer)  # under accelerate's wrapper
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.log_sigma = accelerator.unwrap_model(model).log_sigma  # None but for loss.recon=gaussian
        self.recon_kind, self.free_bits = loss_cfg.recon, loss_cfg.free_bits
        self.grad_clip, self.channels_last = grad_clip, channels_last
        self.device = accelerator.device
        self.autocast_dtype = AUTOCAST.get(accelerator.mixed_precision)
        self.scaled = accelerator.scaler is not None  # fp16: the GradScaler owns found_inf
        self.beta = torch.zeros((), device=self.device)
        # one lr tensor per param group: the base lr times the group's lr_scale (the σ-VAE's sigma)
        self.lrs = [torch.zeros((), device=self.device) for _ in self.raw_optimizer.param_groups]
        self.bind_lr()
        self.meters = torch.zeros(MAX_CONSECUTIVE + 1, device=self.device)
        if compile_mode:
            self.forward_loss = torch.compile(self._forward_loss, mode=compile_mode, dynamic=False)
            # the tail mutates grads and meters in place: no CUDA graph (its inputs change every step)
            self.tail = torch.compile(self._tail, dynamic=False)
        else:
            self.forward_loss, self.tail = self._forward_loss, self._tail

    def bind_lr(self) -> None:
        """Points every param group at its lr tensor (again after a checkpoint load, which also
        brings the `capturable` flag of a graphed run: GraphedStep sets it again when it captures)."""
        for group, lr in zip(self.raw_optimizer.param_groups, self.lrs):
            group["lr"] = lr
            group["capturable"] = False

    def _forward_loss(self, images: torch.Tensor, beta: torch.Tensor):
        images = unit_float(images)  # uint8 from the loaders: converted here, fused by the compiler
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        # no cast cache: under a CUDA graph capture a cached bf16 copy of a weight would be the
        # captured one and replays would read stale weights (PyTorch's CUDA-graph notes), and the
        # cache saves nothing here (each weight is cast once a forward); the same setting with and
        # without the graph also lets both share one compiled graph (inductor's cache)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=False):
            x_hat, mu, logvar = self.model(images)
        recon = recon_loss(x_hat, images, self.recon_kind, self.log_sigma)
        kl, kl_objective = kl_terms(mu, logvar, self.free_bits)
        return recon + beta * kl_objective, recon, kl, kl_objective

    def __call__(self, images: torch.Tensor, lr: float, beta: float) -> None:
        self.set_schedule(lr, beta)
        self.update(images)

    def set_schedule(self, lr: float, beta: float) -> None:
        for group, group_lr in zip(self.raw_optimizer.param_groups, self.lrs):
            group_lr.fill_(lr * group.get("lr_scale", 1.0))  # host -> device writes: launches, not syncs
        self.beta.fill_(beta)

    def update(self, images: torch.Tensor, zero_grad: bool = True) -> None:
        """Forward, backward, clip, meters, the optimizer's step: what a CUDA graph captures
        (`zero_grad=False` there: the captured backward writes the same gradient tensors each replay)."""
        self.model.train()
        loss, recon, kl, kl_objective = self.forward_backward(images)
        if self.scaled:
            self.accelerator.unscale_gradients()
        found_inf = self.tail(self.params, self.meters, loss, recon, kl, kl_objective)
        if self.scaled:  # fp16: the GradScaler owns found_inf and the wrapper's step applies it
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        else:
            # Gradients are already averaged over ranks, so every rank sees the same norm and
            # skips the same steps without another collective.
            self.raw_optimizer.found_inf = found_inf
            self.raw_optimizer.step()
            if zero_grad:
                self.raw_optimizer.zero_grad(set_to_none=True)

    def forward_backward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The batch's gradients, summed over its micro-batches; returns the batch's mean loss
        terms (detached). Every micro-batch but the last keeps its gradients local."""
        k = self.accum_steps
        if k == 1:
            terms = self.forward_loss(images, self.beta)
            self.accelerator.backward(terms[0])
            return [t.detach() for t in terms]
        sums = None
        for i, micro in enumerate(images.chunk(k)):  # the loaders' batches are k equal micro-batches
            with self.accelerator.no_sync(self.model) if i < k - 1 else contextlib.nullcontext():
                terms = self.forward_loss(micro, self.beta)
                self.accelerator.backward(terms[0] / k)
            terms = [t.detach() / k for t in terms]
            sums = terms if sums is None else [a + b for a, b in zip(sums, terms)]
        return sums

    def _tail(self, params, meters, loss, recon, kl, kl_objective) -> torch.Tensor:
        """Gradient norm, clip, meters; returns fused Adam's found_inf (1.0: skip this step)."""
        grad_norm = get_total_norm([p.grad for p in params if p.grad is not None])
        finite = torch.isfinite(grad_norm)
        if self.grad_clip > 0:
            clip_grads_with_norm_(params, self.grad_clip, grad_norm)  # scales each p.grad in place
        good = torch.stack([loss, recon, kl, kl_objective, grad_norm.float(), torch.ones_like(loss)])
        meters[:GOOD + 1] += torch.where(finite, good, torch.zeros_like(good))
        bad = (~finite).float()
        meters[SKIPPED] += bad
        meters[CONSECUTIVE] = (meters[CONSECUTIVE] + 1) * bad
        meters[MAX_CONSECUTIVE] = torch.maximum(meters[MAX_CONSECUTIVE], meters[CONSECUTIVE])
        return bad

    def take_meters(self) -> torch.Tensor:
        """The window's meters (a device tensor), and a fresh window that keeps the current
        run of non-finite steps."""
        out = self.meters.clone()
        self.meters[:SKIPPED + 1] = 0
        self.meters[MAX_CONSECUTIVE] = self.meters[CONSECUTIVE]
        return out


def check_cuda_graph(enabled: bool, device: torch.device, world: int, accum_steps: int, precision: str,
                     compile_mode: str | None) -> None:
    """train.cuda_graph: refused in one line where a whole-step graph cannot run."""
    if not enabled:
        return
    why = ("training does not run on a CUDA GPU" if device.type != "cuda" else
           f"{world} processes (DDP's all-reduce is not captured here; one process only)" if world > 1 else
           f"train.grad_accum_steps={accum_steps} (the graph is one forward and backward)" if accum_steps > 1 else
           "fp16's GradScaler reads its scale on the host (use bf16)" if precision == "fp16" else
           f"model.compile_mode={compile_mode} captures CUDA graphs of its own (use default)"
           if compile_mode in ("reduce-overhead", "max-autotune") else None)
    if why:
        raise ConfigError(f"train.cuda_graph=true but {why}")


class GraphedStep:
    """The whole step (forward, backward, clip, meters, fused Adam) captured once as one CUDA
    graph and replayed from a static input buffer: one launch a step instead of hundreds, which
    is what bounds the seed VAE at small batches. Captured at the first call (after a resume
    has loaded the optimizer state), from three warm-up steps on a side stream whose updates
    are then undone, so training starts from the same weights and Adam state (fresh, or the
    resumed one) as without the graph. lr and beta stay device tensors that the host fills before each replay;
    the meters, the weights and Adam's state are the graph's own tensors, updated in place.
    Everything else (evaluation, checkpoints, the metrics window) sees the TrainStep inside."""

    WARMUP = 3

    def __init__(self, step: TrainStep):
        self.step = step
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_images: torch.Tensor | None = None

    def __getattr__(self, name):  # meters, take_meters, beta, lrs, ...: the TrainStep's
        return getattr(self.step, name)

    def __call__(self, images: torch.Tensor, lr: float, beta: float) -> None:
        self.step.set_schedule(lr, beta)
        if self.graph is None:
            self.capture(images)
        self.static_images.copy_(images, non_blocking=True)
        self.graph.replay()

    def capture(self, images: torch.Tensor) -> None:
        step, opt = self.step, self.step.raw_optimizer
        for group in opt.param_groups:
            group["capturable"] = True  # fused Adam keeps its step count on the device already
        self.static_images = images.clone()
        params = [p.detach().clone() for p in step.params]
        meters = step.meters.clone()
        state = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*capturable=True.*")  # "...running without capture": the warm-up
            for _ in range(self.WARMUP):  # compiles, autotunes cuDNN, creates Adam's state
                step.update(self.static_images)
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():  # undo the warm-up: the same start as an uncaptured run (or a resumed one)
            for p, saved in zip(step.params, params):
                p.copy_(saved)
            for p, values in opt.state.items():  # a resumed state as loaded; one the warm-up made: fresh
                for k, value in values.items():
                    if torch.is_tensor(value) and p in state:
                        value.copy_(state[p][k])
                    elif torch.is_tensor(value):
                        value.zero_()
            step.meters.copy_(meters)
        opt.zero_grad(set_to_none=True)  # the captured backward allocates the gradients it then rewrites
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            step.update(self.static_images, zero_grad=False)
