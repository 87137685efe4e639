"""The discrete VAE (image tokenizer) in the architecture of OpenAI's released dVAE.

Submodule names follow OpenAI's ``dall_e`` package (``blocks.group_1.block_1.res_path.conv_1``)
so its weights load after renaming ``.w``/``.b`` to ``.weight``/``.bias``
(see :mod:`dalle_ds.openai_dvae`); outputs then match to float precision.

Likelihood is the logit-Laplace distribution of the paper: pixels are mapped
into ``[eps, 1 - eps]`` (``map_pixels``) before encoding; the decoder predicts
``mu`` and ``log b`` per channel and the reconstruction is ``unmap_pixels(sigmoid(mu))``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import DVAEConfig

__all__ = [
    "LOGIT_LAPLACE_EPS",
    "DVAEOutput",
    "Decoder",
    "DiscreteVAE",
    "Encoder",
    "kl_to_uniform",
    "logit_laplace_nll",
    "map_pixels",
    "unmap_pixels",
]

LOGIT_LAPLACE_EPS = 0.1


def map_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """[0, 1] pixels -> [eps, 1 - eps], the support the logit-Laplace likelihood models."""
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x: torch.Tensor, eps: float = LOGIT_LAPLACE_EPS) -> torch.Tensor:
    """Inverse of :func:`map_pixels`, clamped to [0, 1]."""
    return torch.clamp((x - eps) / (1 - 2 * eps), 0, 1)


def logit_laplace_nll(y: torch.Tensor, mu: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Elementwise -log p(y) under the logit-Laplace distribution, y in (0, 1).

    p(y) = exp(-|logit(y) - mu| / b) / (2 b y (1 - y)).
    """
    logit_y = torch.log(y) - torch.log1p(-y)
    return math.log(2.0) + log_b + torch.log(y) + torch.log1p(-y) + (logit_y - mu).abs() * torch.exp(-log_b)


def kl_to_uniform(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """KL(softmax(logits) || uniform) over ``dim``: sum q log q + log K."""
    log_q = F.log_softmax(logits.float(), dim=dim)
    return (log_q.exp() * log_q).sum(dim) + math.log(logits.shape[dim])


def _conv(n_in: int, n_out: int, kw: int) -> nn.Conv2d:
    conv = nn.Conv2d(n_in, n_out, kw, padding=(kw - 1) // 2)
    nn.init.normal_(conv.weight, std=1 / math.sqrt(n_in * kw**2))
    nn.init.zeros_(conv.bias)
    return conv


class ResBlock(nn.Module):
    """identity (1x1 conv when widths differ) + post_gain * res_path, post_gain = 1 / n_layers**2."""

    def __init__(self, n_in: int, n_out: int, n_layers: int, kernels: tuple[int, int, int, int]):
        super().__init__()
        n_hid = n_out // 4
        self.post_gain = 1 / n_layers**2
        self.id_path = _conv(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        widths = [n_in, n_hid, n_hid, n_hid, n_out]
        layers = []
        for i, kw in enumerate(kernels):
            layers += [(f"relu_{i + 1}", nn.ReLU()), (f"conv_{i + 1}", _conv(widths[i], widths[i + 1], kw))]
        self.res_path = nn.Sequential(OrderedDict(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


def _check_input(x: torch.Tensor, channels: int, what: str) -> None:
    if x.dim() != 4:
        raise ValueError(f"{what} input shape {tuple(x.shape)} is not 4-d (B, C, H, W)")
    if x.shape[1] != channels:
        raise ValueError(f"{what} input has {x.shape[1]} channels but model built for {channels}")


def _blocks(config: DVAEConfig, input_conv: nn.Conv2d, widths: list[int], kernels, resample, n_out: int):
    """OpenAI's layout: input conv, groups of res blocks (``resample`` between groups), ReLU + 1x1 conv."""
    n_layers = config.group_count * config.n_blk_per_group
    blocks: list[tuple[str, nn.Module]] = [("input", input_conv)]
    n_in = input_conv.out_channels
    for g, width in enumerate(widths):
        group: list[tuple[str, nn.Module]] = []
        for i in range(config.n_blk_per_group):
            group.append((f"block_{i + 1}", ResBlock(n_in, width, n_layers, kernels)))
            n_in = width
        if g < config.group_count - 1:
            group.append(resample())
        blocks.append((f"group_{g + 1}", nn.Sequential(OrderedDict(group))))
    output = OrderedDict([("relu", nn.ReLU()), ("conv", _conv(n_in, n_out, 1))])
    blocks.append(("output", nn.Sequential(output)))
    return nn.Sequential(OrderedDict(blocks))


class Encoder(nn.Module):
    """Mapped pixels (B, C, H, W) -> code logits (B, K, H / f, W / f)."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.config = c = config
        widths = [c.n_hid * 2**g for g in range(c.group_count)]
        self.blocks = _blocks(
            c,
            _conv(c.channels, c.n_hid, 7),
            widths,
            (3, 3, 3, 1),
            lambda: ("pool", nn.MaxPool2d(kernel_size=2)),
            c.codebook_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.config.channels, "Encoder")
        return self.blocks(x)


class Decoder(nn.Module):
    """One-hot (or relaxed) codes (B, K, h, w) -> (B, 2C, h * f, w * f): C means, C log-scales."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.config = c = config
        widths = [c.n_hid * 2**g for g in reversed(range(c.group_count))]
        self.blocks = _blocks(
            c,
            _conv(c.codebook_size, c.n_init, 1),
            widths,
            (1, 3, 3, 3),
            lambda: ("upsample", nn.Upsample(scale_factor=2, mode="nearest")),
            2 * c.channels,
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_input(z, self.config.codebook_size, "Decoder")
        return self.blocks(z)


class DVAEOutput(NamedTuple):
    """Model outputs; a NamedTuple so engines that hook module outputs (ZeRO-3) see the tensors."""

    loss: torch.Tensor  # ELBO-style loss in nats per pixel dimension
    recon_nll: torch.Tensor  # logit-Laplace NLL, mean per pixel dimension
    kl: torch.Tensor  # KL to uniform, mean per code position
    logits: torch.Tensor  # (B, K, h, w) encoder logits
    reconstruction: torch.Tensor  # (B, C, H, W) in [0, 1]


class DiscreteVAE(nn.Module):
    """Encoder + decoder with gumbel-softmax relaxation for training, argmax codes for use."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    def forward(
        self, images: torch.Tensor, temperature: float = 1.0, kl_weight: float = 0.0, hard: bool = False
    ) -> DVAEOutput:
        """Training step. images: (B, C, H, W) in [0, 1]."""
        _check_input(images, self.config.channels, "DiscreteVAE")
        x = map_pixels(images.float())
        logits = self.encoder(x)  # (B, K, h, w)
        z = F.gumbel_softmax(logits.float(), tau=temperature, hard=hard, dim=1).to(logits.dtype)
        stats = self.decoder(z).float()  # (B, 2C, H, W)
        mu, log_b = stats.chunk(2, dim=1)
        recon_nll = logit_laplace_nll(x, mu, log_b).mean()
        kl = kl_to_uniform(logits, dim=1).mean()
        # Both terms in nats per pixel dimension: scale the per-position KL by positions / pixel dims.
        n_pos, n_dim = logits[0, 0].numel(), x[0].numel()
        loss = recon_nll + kl_weight * kl * n_pos / n_dim
        recon = unmap_pixels(torch.sigmoid(mu.detach()))
        return DVAEOutput(loss, recon_nll, kl, logits, recon)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels in [0, 1] -> (B, h, w) int64 codes (argmax, no noise)."""
        _check_input(images, self.config.channels, "DiscreteVAE.encode")
        return self.encoder(map_pixels(images.float())).argmax(dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int codes (or (B, h*w)) -> (B, C, H, W) pixels in [0, 1]."""
        if codes.dim() == 2:
            side = math.isqrt(codes.shape[1])
            codes = codes.reshape(codes.shape[0], side, side)
        z = F.one_hot(codes.long(), self.config.codebook_size).permute(0, 3, 1, 2)
        param = next(self.decoder.parameters())
        stats = self.decoder(z.to(param.dtype)).float()
        return unmap_pixels(torch.sigmoid(stats[:, : self.config.channels]))
