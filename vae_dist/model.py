"""The convolutional VAE of the seed coursework, and nothing else (no I/O, no distribution).

Default config = the seed: Conv2d 3->64->128->256->512 (kernel 4, stride 2, padding 1) with
ReLU, linear heads to a 128-d mean and log-variance, a linear layer back to 512x4x4 and
ConvTranspose2d 512->256->128->64->3 with ReLU between and a final Sigmoid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class VAEConfig:
    image_size: int = 64  # input height and width (must divide by 2**len(widths))
    in_channels: int = 3  # image channels (3: RGB)
    widths: tuple[int, ...] = (64, 128, 256, 512)  # encoder conv channels, mirrored by the decoder (the seed's)
    latent_dim: int = 128  # size of z (the seed's 128)
    learned_sigma: bool = False  # one learned output scale sigma (the σ-VAE's decoder, loss.recon=gaussian)

    @property
    def num_dims(self) -> int:
        """Values per image, channels x height x width: what bits/dim and per-subpixel MSE divide by."""
        return self.in_channels * self.image_size**2


def _conv(c_in: int, c_out: int) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=4, stride=2, padding=1)


def _deconv(c_in: int, c_out: int) -> nn.ConvTranspose2d:
    return nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1)


class VAE(nn.Module):
    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or VAEConfig()
        widths = list(cfg.widths)
        self.feature_size = cfg.image_size // 2 ** len(widths)  # 64 / 16 = 4
        flat = widths[-1] * self.feature_size**2

        enc: list[nn.Module] = []
        for c_in, c_out in zip([cfg.in_channels] + widths[:-1], widths):
            enc += [_conv(c_in, c_out), nn.ReLU(inplace=True)]
        self.encoder = nn.Sequential(*enc)
        self.fc_mu = nn.Linear(flat, cfg.latent_dim)
        self.fc_logvar = nn.Linear(flat, cfg.latent_dim)

        self.fc_decode = nn.Linear(cfg.latent_dim, flat)
        rev = widths[::-1]  # 512, 256, 128, 64
        dec: list[nn.Module] = []
        for c_in, c_out in zip(rev, rev[1:]):
            dec += [_deconv(c_in, c_out), nn.ReLU(inplace=True)]
        dec += [_deconv(rev[-1], cfg.in_channels), nn.Sigmoid()]
        self.decoder = nn.Sequential(*dec)
        # p(x|z) = N(decoder(z), sigma^2 I); the seed's MSE has no sigma (it is calibrated afterwards)
        self.log_sigma = nn.Parameter(torch.zeros(())) if cfg.learned_sigma else None

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x).flatten(1)
        return self.fc_mu(h), self.fc_logvar(h)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc_decode(z).view(-1, self.cfg.widths[-1], self.feature_size, self.feature_size)
        return self.decoder(h)

    @staticmethod
    def reparameterize(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        return self.decode(self.reparameterize(mu, logvar)), mu, logvar

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images decoded from z ~ N(0, I); pass a generator for fixed noise."""
        device = next(self.parameters()).device
        z = torch.randn(n, self.cfg.latent_dim, generator=generator, device="cpu").to(device)
        return self.decode(z)

    @torch.no_grad()
    def interpolate(self, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 8) -> torch.Tensor:
        """Decodes `steps` points on the line between the posterior means of x_a and x_b.

        x_a, x_b: (B, C, H, W). Returns (B, steps, C, H, W); steps include both ends.
        """
        mu_a, _ = self.encode(x_a)
        mu_b, _ = self.encode(x_b)
        t = torch.linspace(0, 1, steps, device=mu_a.device, dtype=mu_a.dtype).view(1, steps, 1)
        z = torch.lerp(mu_a.unsqueeze(1), mu_b.unsqueeze(1), t)  # (B, steps, D)
        out = self.decode(z.flatten(0, 1))
        return out.view(x_a.shape[0], steps, *out.shape[1:])
