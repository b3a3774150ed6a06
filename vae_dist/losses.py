"""ELBO terms and KL-weight schedules. Everything here is a pure function.

Loss = recon + beta(step) * KL, in nats per image: recon is the seed's MSE summed over
pixels and averaged over the batch (or the per-pixel mean variant), KL is the analytic
KL(q(z|x) || N(0, I)) summed over latent dims and averaged over the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


def recon_loss(x_hat: torch.Tensor, x: torch.Tensor, reduction: str = "sum",
               log_sigma: torch.Tensor | None = None) -> torch.Tensor:
    """'sum': squared error summed over pixels, averaged over images (the seed's).
    'mean': averaged over pixels too. 'gaussian': the σ-VAE's NLL with the learned log_sigma."""
    if reduction == "gaussian":
        return gaussian_nll(x_hat, x, log_sigma)
    if reduction == "sum":
        return F.mse_loss(x_hat.float(), x.float(), reduction="sum") / x.shape[0]
    if reduction == "mean":
        return F.mse_loss(x_hat.float(), x.float(), reduction="mean")
    raise ValueError(f"unknown reduction {reduction!r}")


def kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)) per latent dim, averaged over the batch: (D,)."""
    mu, logvar = mu.float(), logvar.float()
    return (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)).mean(0)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float = 0.0) -> torch.Tensor:
    """KL to N(0, I) per image, as the objective penalizes it (`kl_terms`' second)."""
    return kl_terms(mu, logvar, free_bits)[1]


def kl_terms(mu: torch.Tensor, logvar: torch.Tensor, free_bits: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(the KL per image, the KL the objective penalizes): the same number without free bits.
    With free_bits > 0 the second clamps each dim's batch-mean KL from below (Kingma et al.
    2016), so dims under the budget get no gradient pushing them to 0; the first is the real KL."""
    per_dim = kl_per_dim(mu, logvar)
    kl = per_dim.sum()
    return kl, (per_dim.clamp(min=free_bits).sum() if free_bits > 0 else kl)


def gaussian_nll(x_hat: torch.Tensor, x: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """-log N(x; x_hat, sigma^2) summed over pixels, averaged over images: the σ-VAE's
    reconstruction term (Rybkin et al. 2021) with one learned sigma for every pixel."""
    d = x[0].numel()
    sq = (x_hat.float() - x.float()).pow(2).flatten(1).sum(1)
    log_sigma = log_sigma.float()
    return (sq / (2 * torch.exp(2 * log_sigma)) + d * (log_sigma + 0.5 * math.log(2 * math.pi))).mean()


def _log_bin_mass(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, accurate in both tails and for narrow bins."""
    flip = lo > 0  # on the right, use the left tail of the mirror image: Phi(-lo) - Phi(-hi)
    lo, hi = torch.where(flip, -hi, lo), torch.where(flip, -lo, hi)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    d = (log_lo - log_hi).clamp(max=-torch.finfo(lo.dtype).tiny)
    return log_hi + torch.log(-torch.expm1(d))


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor | float,
                                        levels: int = 256) -> torch.Tensor:
    """log p(x | mean, sigma) in nats per image, for x on the grid k/(levels-1): each of the
    `levels` values is a bin of width 1/(levels-1) of a Gaussian around `mean`; the edge bins
    take the tails. No continuous-density shortcut: a proper likelihood of 8-bit images."""
    x, mean = x.double(), mean.double()
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
    half = 0.5 / (levels - 1)
    lo = torch.where(x <= half, torch.full_like(x, -math.inf), (x - half - mean) / sigma)
    hi = torch.where(x >= 1 - half, torch.full_like(x, math.inf), (x + half - mean) / sigma)
    return _log_bin_mass(lo, hi).flatten(1).sum(1)


def bits_per_dim(nats_per_image: torch.Tensor | float, num_dims: int) -> torch.Tensor | float:
    """A negative log-likelihood (of 8-bit images, discretized) in nats per image, in bits per
    subpixel."""
    return nats_per_image / (num_dims * math.log(2))


def psnr(mse_per_pixel: torch.Tensor | float) -> torch.Tensor | float:
    """Peak signal-to-noise ratio in dB for images in [0, 1]."""
    if isinstance(mse_per_pixel, torch.Tensor):
        return 10 * torch.log10(1.0 / mse_per_pixel.clamp(min=1e-12))
    return 10 * math.log10(1.0 / max(mse_per_pixel, 1e-12))


# ---------------------------------------------------------------------------------------
# KL weight schedules: beta as a function of the optimizer step


def constant_beta(step: int, beta: float = 1.0) -> float:
    return beta


def linear_beta(step: int, warmup_steps: int, beta: float = 1.0) -> float:
    """0 at step 0, rising linearly to beta at warmup_steps, then flat."""
    if warmup_steps <= 0:
        return beta
    return beta * min(1.0, step / warmup_steps)


def sigmoid_beta(step: int, warmup_steps: int, beta: float = 1.0, sharpness: float = 10.0) -> float:
    """A logistic ramp centred at warmup_steps / 2 that reaches ~beta at warmup_steps."""
    if warmup_steps <= 0:
        return beta
    x = sharpness * (step / warmup_steps - 0.5)
    return beta / (1.0 + math.exp(-x))


def cyclical_beta(step: int, total_steps: int, cycles: int = 4, ratio: float = 0.5, beta: float = 1.0) -> float:
    """Fu et al. 2019: training split into `cycles` equal periods; in each, beta rises
    linearly from 0 over the first `ratio` of the period, then stays at beta."""
    period = max(1, total_steps) / max(1, cycles)
    tau = (step % period) / period
    return beta * min(1.0, tau / ratio)


def make_kl_schedule(loss_cfg, total_steps: int) -> Callable[[int], float]:
    """beta(step) for the configured schedule over a run of total_steps optimizer steps."""
    warmup = int(round(loss_cfg.kl_warmup * total_steps))
    kind = loss_cfg.kl_schedule
    if kind == "constant":
        return lambda step: constant_beta(step, loss_cfg.beta)
    if kind == "linear":
        return lambda step: linear_beta(step, warmup, loss_cfg.beta)
    if kind == "sigmoid":
        return lambda step: sigmoid_beta(step, warmup, loss_cfg.beta)
    if kind == "cyclical":
        return lambda step: cyclical_beta(step, total_steps, loss_cfg.kl_cycles, loss_cfg.kl_ratio, loss_cfg.beta)
    raise ValueError(f"unknown KL schedule {kind!r}")
