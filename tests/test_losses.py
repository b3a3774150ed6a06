"""ELBO terms and KL schedules."""

import math

import pytest
import torch

from vae_dist.config import LossConfig
from vae_dist.losses import (
    bits_per_dim,
    constant_beta,
    cyclical_beta,
    kl_divergence,
    linear_beta,
    make_kl_schedule,
    psnr,
    recon_loss,
    sigmoid_beta,
)


def test_kl_of_standard_normal_is_zero_and_positive_otherwise():
    mu, logvar = torch.zeros(4, 16), torch.zeros(4, 16)
    assert kl_divergence(mu, logvar).item() == pytest.approx(0.0, abs=1e-7)
    # one dim with mean 1: KL = 0.5 * mu^2 = 0.5
    mu[:, 0] = 1.0
    assert kl_divergence(mu, logvar).item() == pytest.approx(0.5)
    # variance e: 0.5 * (e - 1 - 1)
    assert kl_divergence(torch.zeros(2, 1), torch.ones(2, 1)).item() == pytest.approx(0.5 * (math.e - 2))


def test_free_bits_clamp_each_dim_from_below():
    mu, logvar = torch.zeros(4, 8), torch.zeros(4, 8)
    assert kl_divergence(mu, logvar, free_bits=0.25).item() == pytest.approx(8 * 0.25)


def test_recon_sum_is_per_image_and_mean_is_per_pixel():
    x, y = torch.zeros(2, 3, 4, 4), torch.full((2, 3, 4, 4), 0.5)
    assert recon_loss(y, x, "sum").item() == pytest.approx(48 * 0.25)
    assert recon_loss(y, x, "mean").item() == pytest.approx(0.25)


def test_bits_per_dim_and_psnr():
    assert bits_per_dim(math.log(2) * 10, 10) == pytest.approx(1.0)
    assert psnr(0.01) == pytest.approx(20.0)


def test_schedules_at_chosen_steps():
    assert constant_beta(123, 0.7) == 0.7
    assert [linear_beta(s, 100) for s in (0, 50, 100, 500)] == [0.0, 0.5, 1.0, 1.0]
    assert sigmoid_beta(50, 100) == pytest.approx(0.5)
    assert sigmoid_beta(0, 100) < 0.01 and sigmoid_beta(100, 100) > 0.99
    # 4 cycles over 400 steps, rising over the first half of each
    assert [cyclical_beta(s, 400, 4, 0.5) for s in (0, 25, 50, 99, 100, 125)] == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5]


def test_make_kl_schedule_uses_warmup_fraction():
    beta = make_kl_schedule(LossConfig(kl_schedule="linear", kl_warmup=0.5, beta=2.0), total_steps=100)
    assert (beta(0), beta(25), beta(50), beta(99)) == (0.0, 1.0, 2.0, 2.0)
    cyc = make_kl_schedule(LossConfig(kl_schedule="cyclical", kl_cycles=2, kl_ratio=0.5), total_steps=100)
    assert (cyc(0), cyc(25), cyc(49), cyc(50)) == (0.0, 1.0, 1.0, 0.0)
