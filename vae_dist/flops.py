"""Model FLOPs per image and device peaks: the `mfu` of train rows and of `bench step`.

MFU = model FLOPs per second / the device's dense peak. The FLOPs are counted once per
configuration by PyTorch's FlopCounterMode over a forward + backward on the meta device (shapes
only, nothing computed); the peak comes from the GPU's name, or `log.peak_tflops`.
"""

from __future__ import annotations

import torch

# Dense peak FLOP/s by device name fragment: (bf16/fp16, tf32). H100/H200 are the SXM figures;
# fp32 training runs TF32 matmuls/convolutions (distributed.configure_cuda_math), so its peak is TF32's.
PEAK_FLOPS = {"H200": (989e12, 494e12), "H100": (989e12, 494e12), "A100": (312e12, 156e12)}


def train_flops_per_image(vae_cfg) -> float:
    """Forward + backward FLOPs of one training image (~1.3 GFLOP for the seed VAE)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vae_dist.losses import kl_divergence, recon_loss
    from vae_dist.model import VAE

    with torch.device("meta"):
        model = VAE(vae_cfg)
        x = torch.rand(2, vae_cfg.in_channels, vae_cfg.image_size, vae_cfg.image_size)
    with FlopCounterMode(display=False) as counter:
        x_hat, mu, logvar = model(x)
        (recon_loss(x_hat, x) + kl_divergence(mu, logvar)).backward()
    return counter.get_total_flops() / 2


def peak_flops(device: torch.device, precision: str, configured_tflops: float | None = None) -> float | None:
    """One device's dense peak FLOP/s for this precision ('no'/'fp32', 'bf16', 'fp16'); None
    where it is not known (CPUs, unlisted GPUs) and not configured."""
    if configured_tflops is not None:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peaks = next((v for k, v in PEAK_FLOPS.items() if k in name), None)
    if peaks is None:
        return None
    return peaks[0] if precision in ("bf16", "fp16") else peaks[1]
