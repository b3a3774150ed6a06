"""The process group as training sees it: the Accelerator a run uses, the CUDA math it runs
under, and what one rank decides or says for all of them.

All ranks build the same state and enter the same collectives; a decision that touches the
shared file system (claiming the run folder, verifying shards) is made on rank 0 and its
result, or its error, handed to every rank, so all of them go on or stop together.
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast_object_list
from accelerate.utils.dataclasses import DDPCommunicationHookType

from vae_dist.config import Config
from vae_dist.errors import ConfigError, SharedError, UserError, first_line


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
    accelerator = Accelerator(
        # Without CUDA, accelerate only forms a (gloo) process group when told cpu=True;
        # otherwise `accelerate launch --multi_gpu` on a CPU machine runs N separate jobs.
        cpu=not on_cuda,
        mixed_precision=None if launched else precision,
        step_scheduler_with_optimizer=False,
        kwargs_handlers=[ddp_kwargs(cfg.train)],
    )
    if accelerator.mixed_precision in ("bf16", "fp16") and not on_cuda:
        print_once(accelerator, cpu_precision_warning(accelerator.mixed_precision, accelerator.num_processes, launched))
    return accelerator


def cpu_precision_warning(precision: str, world: int, launched: bool) -> str:
    """One line for a run that asked for GPU precision on a machine without CUDA. Several processes
    launched with it are a GPU launch config (accelerate_config.yaml: 8 GPUs of one node, bf16) on
    the wrong machine: they still run, on the CPU with gloo, so say what to launch here instead."""
    slow = f"{precision} autocast on this CPU is many times slower than fp32"
    if not (launched and world > 1):
        return f"vae-dist: warning: {slow}"
    return (f"vae-dist: warning: accelerate launch started {world} processes with {precision} as for GPUs (a config "
            f"such as accelerate_config.yaml, made for 8 GPUs of one node), but this machine has no CUDA: they run "
            f"on the CPU with gloo, and {slow}; on a CPU launch bash launch/train_cpu_dev.sh "
            f"(or accelerate launch --num_processes N --mixed_precision no)")


COMM_HOOKS = {"none": DDPCommunicationHookType.NO, "bf16": DDPCommunicationHookType.BF16,
              "fp16": DDPCommunicationHookType.FP16, "powersgd": DDPCommunicationHookType.POWER_SGD}
WIRE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # what a compressing hook all-reduces (others: fp32)


def ddp_kwargs(train) -> DistributedDataParallelKwargs:
    """How DDP moves gradients (train.ddp_*), through Accelerate's own handler: it builds the DDP
    wrapper with these and registers the comm hook. broadcast_buffers stays at its default: the
    VAE has no buffers, so there is nothing to broadcast (torch >= 2.12 deprecates the switch)."""
    powersgd = {"matrix_approximation_rank": train.powersgd_rank, "start_powerSGD_iter": train.powersgd_start}
    return DistributedDataParallelKwargs(
        bucket_cap_mb=train.ddp_bucket_mb, gradient_as_bucket_view=train.ddp_bucket_view,
        static_graph=train.ddp_static_graph, comm_hook=COMM_HOOKS[train.ddp_comm_hook],
        comm_state_option=powersgd if train.ddp_comm_hook == "powersgd" else {})


def check_ddp_knobs(train) -> None:
    """DDP settings that cannot run together, refused before anything starts."""
    if train.ddp_static_graph and train.grad_accum_steps > 1:
        # torch's reducer asserts (expect_autograd_hooks_) at the first no_sync backward of a static graph
        raise ConfigError(f"train.ddp_static_graph=true cannot run with train.grad_accum_steps={train.grad_accum_steps}: "
                          "DDP's static graph has no no_sync for the micro-batches; set train.ddp_static_graph=false")


def check_comm_hook(accelerator: Accelerator, hook: str) -> None:
    """Refuses, in one line and on every rank alike, a comm hook the process group's backend
    cannot run, before the first step would fail (or hang) inside DDP's reducer:
    - powersgd on gloo: its hook chains each bucket's all-reduces through future callbacks,
      which gloo runs on its own threads; with several buckets (the seed VAE has 3) the ranks
      issue them in different orders and gloo aborts on a collective mismatch (measured here);
    - bf16/fp16 where the backend has no reduction for that dtype (older gloo builds lack
      bfloat16): probed with a 1-element all-reduce."""
    if hook == "none" or accelerator.num_processes == 1:
        return
    import torch.distributed as dist

    backend = dist.get_backend()
    if hook == "powersgd":
        if backend == "gloo":
            raise SharedError("train.ddp_comm_hook=powersgd on gloo (CPU processes): its chained all-reduces run on "
                              "gloo's threads and reach the ranks in different orders (a collective mismatch); use it "
                              "on GPUs (NCCL), or train.ddp_comm_hook=bf16 here")
        return
    dtype = WIRE_DTYPES[hook]
    try:
        dist.all_reduce(torch.ones(1, dtype=dtype, device=accelerator.device))
    except RuntimeError as e:
        raise SharedError(f"train.ddp_comm_hook={hook}: the {backend} backend cannot all-reduce "
                          f"{str(dtype).removeprefix('torch.')} tensors ({first_line(e)}); use train.ddp_comm_hook=none "
                          f"or another hook") from None


def free_port() -> int:
    """A free TCP port on this host for a launch's rendezvous (`--main_process_port`)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def print_once(accelerator: Accelerator, text: str) -> None:
    """A line from the main process only (accelerator.print prints once per node)."""
    if accelerator.is_main_process:
        print(text, flush=True)


def rank_zero_decides(accelerator: Accelerator, decide):
    """Runs `decide` on rank 0 and hands its result (or its UserError) to every rank. Any other
    exception on rank 0 is handed on too, as a marker, before rank 0 raises it (its traceback
    is the report): the other ranks stop with a SharedError, silent, instead of waiting in the
    broadcast until the launcher's timeout."""
    result = error = failure = None
    if accelerator.is_main_process:
        try:
            result = decide()
        except UserError as e:
            error = str(e)
        except BaseException as e:
            failure = e
            error = _RANK_ZERO_FAILED.format(type(e).__name__, first_line(e))
    if accelerator.num_processes > 1:
        result, error = broadcast_object_list([result, error])
    if failure is not None:
        raise failure
    if error is not None:
        raise SharedError(error)
    return result


# what the other ranks raise (and keep to themselves) where rank 0 failed with an error not the user's
_RANK_ZERO_FAILED = "rank 0 failed ({}: {}); its traceback is in its output"
