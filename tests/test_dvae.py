import math

import pytest
import torch
import torch.nn.functional as F

from dalle_ds import DiscreteVAE, DVAEConfig, get_preset, map_pixels, unmap_pixels
from dalle_ds.dvae import kl_to_uniform, logit_laplace_nll


def test_map_unmap_round_trip_and_range():
    x = torch.rand(2, 3, 8, 8)
    y = map_pixels(x)
    assert y.min() >= 0.1 - 1e-7 and y.max() <= 0.9 + 1e-7
    torch.testing.assert_close(unmap_pixels(y), x)


def test_logit_laplace_nll_matches_change_of_variables():
    y = torch.rand(1000, dtype=torch.float64) * 0.8 + 0.1
    mu, log_b = torch.randn(1000, dtype=torch.float64), torch.randn(1000, dtype=torch.float64) * 0.5
    logit = torch.log(y / (1 - y))
    # log p_y(y) = log Laplace(logit y; mu, b) + log |d logit / dy| = ... - log(y (1 - y))
    ref = -(torch.distributions.Laplace(mu, log_b.exp()).log_prob(logit) - torch.log(y * (1 - y)))
    torch.testing.assert_close(logit_laplace_nll(y, mu, log_b), ref)


def test_logit_laplace_density_integrates_to_one():
    y = torch.linspace(1e-6, 1 - 1e-6, 200001, dtype=torch.float64)
    mu, log_b = torch.tensor(0.3, dtype=torch.float64), torch.tensor(-1.0, dtype=torch.float64)
    p = torch.exp(-logit_laplace_nll(y, mu, log_b))
    assert abs(torch.trapezoid(p, y).item() - 1.0) < 1e-3


def test_kl_to_uniform_matches_torch_distributions():
    logits = torch.randn(4, 16, 3, 3)
    probs = logits.softmax(1).permute(0, 2, 3, 1)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Categorical(probs=probs),
        torch.distributions.Categorical(probs=torch.full_like(probs, 1 / 16)),
    )
    torch.testing.assert_close(kl_to_uniform(logits, dim=1), ref, atol=1e-5, rtol=1e-5)
    assert kl_to_uniform(torch.zeros(1, 16, 1, 1)).abs().max() < 1e-6


def test_shapes_encode_decode_and_grid_factor():
    cfg = get_preset("dvae-tiny")
    vae = DiscreteVAE(cfg)
    x = torch.rand(2, 3, 32, 32)
    codes = vae.encode(x)
    assert codes.shape == (2, 8, 8) and codes.dtype == torch.int64
    assert codes.max() < cfg.codebook_size
    # Codes are the argmax of the logits: no gumbel noise at tokenization time.
    torch.testing.assert_close(codes, vae.encoder(map_pixels(x)).argmax(1))
    out = vae.decode(codes)
    assert out.shape == (2, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    torch.testing.assert_close(vae.decode(codes.flatten(1)), out)
    res = vae(x, temperature=0.5, kl_weight=1.0)
    assert res.logits.shape == (2, 128, 8, 8) and res.reconstruction.shape == x.shape
    expect = res.recon_nll + res.kl * 64 / (3 * 32 * 32)
    torch.testing.assert_close(res.loss, expect)
    cfg2 = DVAEConfig(image_size=32, codebook_size=64, n_hid=16, n_init=8, n_blk_per_group=1, group_count=2)
    assert DiscreteVAE(cfg2).encode(x).shape == (2, 16, 16)


def test_clear_input_errors():
    vae = DiscreteVAE(get_preset("dvae-tiny"))
    with pytest.raises(ValueError, match="input has 4 channels but model built for 3"):
        vae.encode(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match="not 4-d"):
        vae.encoder(torch.rand(3, 32, 32))


def test_tiny_dvae_learns_to_reconstruct():
    torch.manual_seed(0)
    cfg = DVAEConfig(image_size=16, codebook_size=16, n_hid=32, n_init=16, n_blk_per_group=1, group_count=2)
    vae = DiscreteVAE(cfg)
    # Four flat-coloured 16x16 images.
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [1.0, 1.0, 0]])
    x = colours[:, :, None, None].expand(4, 3, 16, 16).contiguous()
    mse_before = F.mse_loss(vae.decode(vae.encode(x)), x).item()
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    losses = []
    for _ in range(200):
        out = vae(x, temperature=1.0, kl_weight=0.0)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 2.0, (losses[0], losses[-1])
    mse_after = F.mse_loss(vae.decode(vae.encode(x)), x).item()
    assert mse_after < 0.5 * mse_before, (mse_before, mse_after)
