"""The optimizer and its learning-rate schedule.

Fused Adam: one kernel for the whole update, whose `found_inf` input skips a non-finite step
on the device (step.py), so a bad step costs no host sync. The σ-VAE's scalar sigma gets a
param group of its own with a faster lr (optim.sigma_lr_scale) and no weight decay.
"""

from __future__ import annotations

import math

import torch

from vae_dist.model import VAE


def make_optimizer(model: VAE, optim) -> torch.optim.Adam:
    groups = [{"params": [p for n, p in model.named_parameters() if n != "log_sigma"]}]
    if model.log_sigma is not None:
        groups.append({"params": [model.log_sigma], "lr_scale": optim.sigma_lr_scale, "weight_decay": 0.0})
    return torch.optim.Adam(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps, weight_decay=optim.weight_decay,
                            fused=True)


def lr_at(step: int, total_steps: int, optim) -> float:
    """Linear warm-up over optim.warmup_steps, then constant or cosine down to lr x min_lr_ratio."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.lr_schedule == "constant":
        return optim.lr
    progress = (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps)
    floor = optim.lr * optim.min_lr_ratio
    return floor + (optim.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
