"""The data: the sources pack reads (Tiny ImageNet, folders of images), sample data, packing
and verifying shards, and the loaders.

Every loader yields uint8 NCHW batches: a quarter of the bytes of float to decode into,
copy and move to the GPU; the step turns them into floats inside its compiled region.
"""

import os

import torch


def available_cores() -> int:
    """The cores this process may run on (a SLURM job's or a container's, not the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def unit_float(images: torch.Tensor) -> torch.Tensor:
    """A uint8 batch as float in [0, 1] (a float batch passes through)."""
    return images.float() / 255 if images.dtype == torch.uint8 else images
