"""The VAE: the seed architecture exactly, shapes, gradients, sample/interpolate, compile."""

import pytest
import torch
from torch import nn

from vae_dist.model import VAE, VAEConfig


def _layers(seq, kind):
    return [m for m in seq if isinstance(m, kind)]


def test_default_is_the_seed_architecture():
    m = VAE()
    convs = _layers(m.encoder, nn.Conv2d)
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 64), (64, 128), (128, 256), (256, 512)]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) and c.padding == (1, 1) for c in convs)
    assert len(_layers(m.encoder, nn.ReLU)) == 4 and len(m.encoder) == 8
    assert (m.fc_mu.in_features, m.fc_mu.out_features) == (512 * 4 * 4, 128)
    assert (m.fc_logvar.in_features, m.fc_logvar.out_features) == (512 * 4 * 4, 128)
    assert (m.fc_decode.in_features, m.fc_decode.out_features) == (128, 512 * 4 * 4)
    deconvs = _layers(m.decoder, nn.ConvTranspose2d)
    assert [(c.in_channels, c.out_channels) for c in deconvs] == [(512, 256), (256, 128), (128, 64), (64, 3)]
    assert all(c.kernel_size == (4, 4) and c.stride == (2, 2) and c.padding == (1, 1) for c in deconvs)
    kinds = [type(x) for x in m.decoder]
    assert kinds == [nn.ConvTranspose2d, nn.ReLU] * 3 + [nn.ConvTranspose2d, nn.Sigmoid]


def test_forward_shapes_range_and_gradients():
    torch.manual_seed(0)
    m = VAE()
    x = torch.rand(2, 3, 64, 64)
    x_hat, mu, logvar = m(x)
    assert x_hat.shape == x.shape and mu.shape == (2, 128) and logvar.shape == (2, 128)
    assert x_hat.min() >= 0 and x_hat.max() <= 1
    (x_hat.sum() + mu.sum() + logvar.sum()).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"no gradient reaches {name}"


def test_sample_and_interpolate_shapes():
    m = VAE(VAEConfig(widths=(8, 16, 16, 32), latent_dim=8))
    g = torch.Generator().manual_seed(0)
    s1 = m.sample(5, generator=g)
    assert s1.shape == (5, 3, 64, 64)
    assert torch.equal(s1, m.sample(5, generator=torch.Generator().manual_seed(0)))  # fixed noise
    xa, xb = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    path = m.interpolate(xa, xb, steps=7)
    assert path.shape == (3, 7, 3, 64, 64)
    mu_a, _ = m.encode(xa)
    torch.testing.assert_close(path[:, 0], m.decode(mu_a))  # the path starts at x_a's mean


def test_configurable_size_and_depth():
    m = VAE(VAEConfig(image_size=32, widths=(16, 32, 64), latent_dim=10))
    x_hat, mu, _ = m(torch.rand(2, 3, 32, 32))
    assert x_hat.shape == (2, 3, 32, 32) and mu.shape == (2, 10)


@pytest.mark.slow
def test_compiled_matches_eager_and_channels_last():
    torch.manual_seed(0)
    m = VAE(VAEConfig(widths=(8, 16, 16, 32), latent_dim=8)).eval()
    x = torch.rand(4, 3, 64, 64)
    mu_e, _ = m.encode(x)
    ref = m.decode(mu_e)
    compiled = torch.compile(m, fullgraph=True)  # fullgraph: no graph breaks allowed
    torch.manual_seed(1)
    # fallback_random: inductor draws the reparameterization noise with eager's RNG
    with torch._inductor.config.patch(fallback_random=True):
        out_c, mu_fc, _ = compiled(x)
    torch.manual_seed(1)
    out_e, mu_fe, _ = m(x)
    torch.testing.assert_close(out_c, out_e, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mu_fc, mu_fe, atol=1e-4, rtol=1e-4)
    m_cl = m.to(memory_format=torch.channels_last)
    out_cl = m_cl.decode(m_cl.encode(x.contiguous(memory_format=torch.channels_last))[0])
    torch.testing.assert_close(out_cl, ref, atol=1e-4, rtol=1e-4)


def test_the_vae_has_no_buffers_for_ddp_to_broadcast():
    """distributed.make_accelerator leaves DDP's buffer broadcast at its default because there
    is nothing to broadcast; a norm layer's running stats would change that."""
    for cfg in (VAEConfig(), VAEConfig(learned_sigma=True)):
        assert list(VAE(cfg).buffers()) == []
