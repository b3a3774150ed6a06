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
from accelerate.utils import broadcast_object_list

from vae_dist.config import Config
from vae_dist.errors import SharedError, UserError


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
        # DDP's defaults: the VAE has no buffers, so there is nothing for DDP to broadcast before a
        # forward (torch >= 2.12 deprecates broadcast_buffers, which once said so, with a warning per rank)
    )
    if accelerator.mixed_precision == "bf16" and not on_cuda:
        print_once(accelerator, "vae-dist: warning: bf16 autocast on this CPU is many times slower than fp32")
    return accelerator


def print_once(accelerator: Accelerator, text: str) -> None:
    """A line from the main process only (accelerator.print prints once per node)."""
    if accelerator.is_main_process:
        print(text, flush=True)


def rank_zero_decides(accelerator: Accelerator, decide):
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
