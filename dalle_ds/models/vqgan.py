"""VQGAN image tokenizer (Esser, Rombach and Ommer 2021, "Taming Transformers"), in the module
layout of taming-transformers' ``VQModel`` so its checkpoints load by name.

Encoder: a 3x3 input conv, then per level ``num_res_blocks`` residual blocks (GroupNorm(32) +
swish + 3x3 conv, twice; a 1x1 ``nin_shortcut`` where the width changes), self-attention blocks at
the resolutions in ``attn_resolutions``, and a stride-2 3x3 conv (padded right and bottom) between
levels; a middle of residual, attention, residual; GroupNorm, swish and a 3x3 conv to
``z_channels``. ``quant_conv`` (1x1) maps to ``embed_dim``, each position takes its nearest code
(squared L2), ``post_quant_conv`` (1x1) maps back, and the decoder mirrors the encoder with
``num_res_blocks + 1`` blocks per level and nearest-neighbour 2x upsampling followed by a 3x3
conv. Pixels are in [-1, 1] inside the model; :meth:`VQGAN.encode` and :meth:`VQGAN.decode` take
and give [0, 1], like the dVAE's.

The quantiser covers both of taming's: ``VectorQuantizer`` (the loss order ``legacy=True``) and
``VectorQuantizer2`` (``legacy``, and ``remap``: the checkpoint's ``quantize.used`` buffer lists the
codes kept, and the codes the transformer sees index that list).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dvae import VectorQuantizer
from .vqgan_config import VQGANConfig

__all__ = ["VQGAN", "VQGANOutput", "VQGANQuantizer"]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6, affine=True)


def _swish(x):
    # x * sigmoid(x) as written (F.silu rounds differently by an ulp, which deep stacks amplify to
    # ~1e-5 in the decoded pixels of a converted checkpoint).
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, n_in: int, n_out: int, dropout: float):
        super().__init__()
        self.norm1, self.conv1 = _norm(n_in), nn.Conv2d(n_in, n_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(n_out), nn.Conv2d(n_out, n_out, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        if n_in != n_out:
            self.nin_shortcut = nn.Conv2d(n_in, n_out, 1)

    def forward(self, x):
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the positions of a feature map (1x1 conv projections)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        # Scores formed explicitly, in the order taming computes them, so converted checkpoints decode
        # to the same pixels (a fused kernel differs by ~1e-5 after the decoder); the maps are small
        # (16 x 16 positions in the public f16 models).
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (conv(y).reshape(b, c, h * w) for conv in (self.q, self.k, self.v))
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c**-0.5, dim=2)  # (b, query, key)
        return x + self.proj_out(torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution: ``block`` (residual blocks), ``attn`` (one per block, or none) and the
    resampling conv (``downsample`` / ``upsample``) where there is one."""

    def __init__(self, blocks: list[nn.Module], attn: list[nn.Module]):
        super().__init__()
        self.block, self.attn = nn.ModuleList(blocks), nn.ModuleList(attn)

    def forward(self, h):
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class _Mid(nn.Module):
    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, h):
        return self.block_2(self.attn_1(self.block_1(h)))


class Encoder(nn.Module):
    def __init__(self, c: VQGANConfig):
        super().__init__()
        self.conv_in = nn.Conv2d(c.channels, c.ch, 3, padding=1)
        self.down = nn.ModuleList()
        res, n_in = c.image_size, c.ch
        for i, mult in enumerate(c.ch_mult):
            n_out = c.ch * mult
            blocks = [ResnetBlock(n_in if j == 0 else n_out, n_out, c.dropout) for j in range(c.num_res_blocks)]
            attn = [AttnBlock(n_out) for _ in blocks] if res in c.attn_resolutions else []
            level = _Level(blocks, attn)
            if i != len(c.ch_mult) - 1:
                level.downsample = Downsample(n_out)
                res //= 2
            self.down.append(level)
            n_in = n_out
        self.mid = _Mid(n_in, c.dropout)
        self.norm_out = _norm(n_in)
        self.conv_out = nn.Conv2d(n_in, c.z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        return self.conv_out(_swish(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    def __init__(self, c: VQGANConfig):
        super().__init__()
        n_in = c.ch * c.ch_mult[-1]
        res = c.image_size // c.downsample
        self.conv_in = nn.Conv2d(c.z_channels, n_in, 3, padding=1)
        self.mid = _Mid(n_in, c.dropout)
        levels = []
        for i in reversed(range(len(c.ch_mult))):
            n_out = c.ch * c.ch_mult[i]
            blocks = [ResnetBlock(n_in if j == 0 else n_out, n_out, c.dropout) for j in range(c.num_res_blocks + 1)]
            attn = [AttnBlock(n_out) for _ in blocks] if res in c.attn_resolutions else []
            level = _Level(blocks, attn)
            if i != 0:
                level.upsample = Upsample(n_out)
                res *= 2
            levels.insert(0, level)
            n_in = n_out
        self.up = nn.ModuleList(levels)  # up[i] is level i, as taming indexes it
        self.norm_out = _norm(n_in)
        self.conv_out = nn.Conv2d(n_in, c.channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight takes its gradient norms from (taming's ``get_last_layer``)."""
        return self.conv_out.weight


class VQGANQuantizer(nn.Module):
    """Nearest-code quantiser with a learned codebook (``embedding``; for remapped checkpoints the
    kept codes in ``used``), or an EMA one (``ema``, ``quantizer: ema``)."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        self.config = c
        if c.quantizer == "ema":
            self.ema = VectorQuantizer(c.n_embed, c.embed_dim, c.ema_decay, c.dead_threshold)
        else:
            self.embedding = nn.Embedding(c.n_embed, c.embed_dim)
            nn.init.uniform_(self.embedding.weight, -1.0 / c.n_embed, 1.0 / c.n_embed)
        if c.remap_codes:
            self.register_buffer("used", torch.arange(c.remap_codes))

    @property
    def codebook(self) -> torch.Tensor:
        return self.ema.codebook if self.config.quantizer == "ema" else self.embedding.weight

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """(N, embed_dim) -> (N,) indices into the codebook (squared L2, fp32)."""
        e = self.codebook.float()
        z = z.float()
        d = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.t()
        return d.argmin(1)

    def to_codes(self, index: torch.Tensor) -> torch.Tensor:
        """Codebook indices -> the codes the transformer sees (the remapped ones for ``remap``)."""
        c = self.config
        if not c.remap_codes:
            return index
        match = index.unsqueeze(-1) == self.used
        codes = match.long().argmax(-1)
        unknown = ~match.any(-1)
        if c.unknown_index == "random":
            fill = torch.randint(0, c.codebook_size, codes.shape, device=codes.device)
        else:
            fill = torch.full_like(codes, c.remap_codes if c.unknown_index == "extra" else c.unknown_index)
        return torch.where(unknown, fill, codes)

    def to_index(self, codes: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_codes` (the 'extra' code reads codebook entry ``used[0]``, as taming's)."""
        if not self.config.remap_codes:
            return codes
        return self.used[codes.masked_fill(codes >= self.used.numel(), 0)]

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z: (B, embed_dim, h, w) -> (straight-through quantised z, codebook loss, codes (B, h, w)).
        An EMA codebook updates itself in training mode; its loss is ``beta`` x the commitment term."""
        b, d, h, w = z.shape
        if self.config.quantizer == "ema":
            zq, index, _ = self.ema(z)
            commit = F.mse_loss(z.float(), zq.detach().float())
            return zq, self.config.beta * commit, index
        index = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)
        zq = self.embedding(index).permute(0, 3, 1, 2).contiguous().to(z.dtype)
        commit = F.mse_loss(z.float(), zq.detach().float())
        codebook = F.mse_loss(zq.float(), z.detach().float())
        beta = self.config.beta
        loss = commit + beta * codebook if self.config.legacy else beta * commit + codebook
        return z + (zq - z).detach(), loss, self.to_codes(index)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, embed_dim, h, w) code vectors."""
        return F.embedding(self.to_index(codes), self.codebook).permute(0, 3, 1, 2).contiguous()


class VQGANOutput(NamedTuple):
    recon: torch.Tensor  # (B, C, H, W) in [-1, 1] (the model's pixel space; not clamped)
    codebook_loss: torch.Tensor  # scalar: commitment + codebook terms
    codes: torch.Tensor  # (B, h, w) int64


class VQGAN(nn.Module):
    """``encoder`` -> ``quant_conv`` -> ``quantize`` -> ``post_quant_conv`` -> ``decoder``."""

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VQGANQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def _check(self, images: torch.Tensor, what: str) -> None:
        c = self.config
        if images.dim() != 4 or images.shape[1] != c.channels:
            raise ValueError(f"{what}: expected (B, {c.channels}, H, W) images, got {tuple(images.shape)}")
        if images.shape[2] % c.downsample or images.shape[3] % c.downsample:
            raise ValueError(f"{what}: image sides {tuple(images.shape[2:])} must be divisible by {c.downsample}")

    def forward(self, images: torch.Tensor) -> VQGANOutput:
        """Training step: images (B, C, H, W) in [0, 1]."""
        self._check(images, "VQGAN")
        z = self.quant_conv(self.encoder((2 * images.float() - 1).to(self.dtype)))
        zq, loss, codes = self.quantize(z)
        return VQGANOutput(self.decoder(self.post_quant_conv(zq)), loss, codes)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels in [0, 1] -> (B, h, w) int64 codes."""
        self._check(images, "VQGAN.encode")
        z = self.quant_conv(self.encoder((2 * images.float() - 1).to(self.dtype)))
        b, d, h, w = z.shape
        index = self.quantize.nearest(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w)
        return self.quantize.to_codes(index)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int codes (or (B, h*w)) -> (B, C, H, W) pixels in [0, 1]."""
        if codes.dim() == 2:
            side = math.isqrt(codes.shape[1])
            codes = codes.reshape(codes.shape[0], side, side)
        z = self.quantize.lookup(codes.long()).to(self.post_quant_conv.weight.dtype)
        x = self.decoder(self.post_quant_conv(z)).float()
        return ((x + 1) / 2).clamp(0, 1)
