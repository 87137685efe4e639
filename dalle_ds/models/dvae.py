"""The discrete VAE (image tokenizer) in the architecture of OpenAI's released dVAE.

Submodule names follow OpenAI's ``dall_e`` package (``blocks.group_1.block_1.res_path.conv_1``)
so its weights load after renaming ``.w``/``.b`` to ``.weight``/``.bias``
(see :func:`dalle_ds.inference.serialization.convert_openai_dvae`); outputs then match to float
precision.

``quantizer: vq`` swaps the gumbel relaxation for straight-through vector quantisation with an EMA
codebook and dead-code restarts (:class:`VectorQuantizer`): the encoder then outputs ``vq_dim``
channels and the decoder reads codebook vectors. Small runs need it: the gumbel recipe's schedules
assume hundreds of thousands of steps, and in a few minutes it collapses onto a fraction of the
codebook (``docs/design.md``, "Small runs: gumbel vs VQ").

Likelihood is the logit-Laplace distribution of the paper: pixels are mapped
into ``[eps, 1 - eps]`` (``map_pixels``) before encoding; the decoder predicts
``mu`` and ``log b`` per channel and the reconstruction is ``unmap_pixels(sigmoid(mu))``.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import NamedTuple, Protocol

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
    "VectorQuantizer",
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
    """Mapped pixels (B, C, H, W) -> code logits (B, K, H / f, W / f); vectors (B, vq_dim, ...) for 'vq'."""

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
            c.vq_dim if c.quantizer == "vq" else c.codebook_size,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.config.channels, "Encoder")
        return self.blocks(x)


class Decoder(nn.Module):
    """One-hot (or relaxed) codes (B, K, h, w) -> (B, 2C, h * f, w * f): C means, C log-scales.
    For 'vq' the input is codebook vectors (B, vq_dim, h, w)."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.config = c = config
        self.in_channels = c.vq_dim if c.quantizer == "vq" else c.codebook_size
        widths = [c.n_hid * 2**g for g in reversed(range(c.group_count))]
        self.blocks = _blocks(
            c,
            _conv(self.in_channels, c.n_init, 1),
            widths,
            (1, 3, 3, 3),
            lambda: ("upsample", nn.Upsample(scale_factor=2, mode="nearest")),
            2 * c.channels,
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        _check_input(z, self.in_channels, "Decoder")
        return self.blocks(z)


class DVAEOutput(NamedTuple):
    """Model outputs; a NamedTuple so engines that hook module outputs (ZeRO-3) see the tensors."""

    loss: torch.Tensor  # training loss: reconstruction term + KL (gumbel) or commitment (vq) term
    recon_nll: torch.Tensor  # logit-Laplace NLL, mean per pixel dimension
    kl: torch.Tensor  # gumbel: KL to uniform, mean per code position; vq: 0
    logits: torch.Tensor  # (B, K, h, w) encoder logits; vq: negative squared distances to the codes
    reconstruction: torch.Tensor  # (B, C, H, W) in [0, 1]
    commitment: torch.Tensor  # vq: mean squared distance of encoder outputs to their codes; gumbel: 0


class Collectives(Protocol):
    """What the quantiser needs from a process group (the trainer passes torch.distributed's)."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> None: ...

    def broadcast(self, tensor: torch.Tensor) -> None: ...


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation against an EMA codebook (van den Oord et al. 2017, App. A.1).

    In training mode every forward pass updates the codebook: assignment counts and summed
    encoder outputs are averaged into EMA statistics (``decay``), and codes whose EMA count drops
    below ``dead_threshold`` restart at random encoder outputs of the batch. The first training
    pass initialises every code from the batch. With several data-parallel ranks, set
    ``collectives``: the statistics are summed over ranks and restart vectors come from rank 0, so
    every rank keeps the same codebook.
    """

    def __init__(self, codebook_size: int, dim: int, decay: float, dead_threshold: float):
        super().__init__()
        self.decay, self.dead_threshold = decay, dead_threshold
        self.collectives: Collectives | None = None
        self.register_buffer("codebook", torch.randn(codebook_size, dim))
        self.register_buffer("cluster_size", torch.zeros(codebook_size))
        self.register_buffer("embed_sum", self.codebook.clone())
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _apply(self, fn, recurse=True):
        # The codebook and its EMA statistics stay fp32 when the module is cast (DeepSpeed casts the
        # whole model to fp16/bf16): a 16-bit EMA would round its small updates away.
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.is_floating_point() and buf.dtype != torch.float32:
                self._buffers[name] = buf.float()
        return self

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """(N, D) vectors -> (N, K) squared distances to every code."""
        book = self.codebook.float()
        z = z.float()
        return (z * z).sum(1, keepdim=True) - 2 * z @ book.t() + (book * book).sum(1)[None]

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) codes -> (B, D, h, w) codebook vectors."""
        return F.embedding(codes.long(), self.codebook).permute(0, 3, 1, 2)

    def _sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.collectives is not None:
            self.collectives.all_reduce_sum(tensor)
        return tensor

    def _samples(self, flat: torch.Tensor, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
        """``n`` random rows of ``flat``, drawn in proportion to ``weights`` when given (rank 0's
        draw, when there are several ranks)."""
        if weights is None or not bool((weights > 0).any()):
            rows = torch.randint(0, flat.shape[0], (n,), device=flat.device)
        else:
            rows = torch.multinomial(weights.float(), n, replacement=True)
        picks = flat[rows].float().contiguous()
        if self.collectives is not None:
            self.collectives.broadcast(picks)
        return picks

    @torch.no_grad()
    def update(self, flat: torch.Tensor, codes: torch.Tensor, error: torch.Tensor | None = None) -> None:
        """One EMA step from encoder outputs ``flat`` (N, D) assigned to ``codes`` (N,).

        Dead codes restart at outputs drawn in proportion to ``error`` (N,), their squared distance
        to the code they got (k-means++ style): in images that are mostly flat background, uniform
        draws would land almost every restart on the background and the codes would die again."""
        k = self.codebook.shape[0]
        flat = flat.float()
        counts = torch.bincount(codes, minlength=k).float()
        sums = torch.zeros(k, flat.shape[1], device=flat.device).index_add_(0, codes, flat)
        counts, sums = self._sum(counts), self._sum(sums)
        if not bool(self.initialized):  # one assignment's weight each: unused codes restart soon
            fresh = self._samples(flat, k)
            self.codebook.copy_(fresh)
            self.cluster_size.fill_(1.0)
            self.embed_sum.copy_(fresh)
            self.initialized.fill_(True)
            return
        size = self.cluster_size.float().mul_(self.decay).add_(counts, alpha=1 - self.decay)
        embed_sum = self.embed_sum.float().mul_(self.decay).add_(sums, alpha=1 - self.decay)
        total = size.sum()
        smoothed = (size + 1e-5) / (total + k * 1e-5) * total  # Laplace smoothing: no division by 0
        book = embed_sum / smoothed[:, None]
        dead = size < self.dead_threshold
        n_dead = int(dead.sum())  # equal on every rank: the statistics are summed over ranks
        if n_dead:
            fresh = self._samples(flat, n_dead, error)
            book[dead] = fresh
            size[dead] = self.dead_threshold
            embed_sum[dead] = fresh * self.dead_threshold
        self.cluster_size.copy_(size)
        self.embed_sum.copy_(embed_sum)
        self.codebook.copy_(book)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, D, h, w) encoder outputs -> (straight-through quantised vectors, codes (B, h, w),
        negative squared distances (B, K, h, w))."""
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        dist = self.distances(flat)
        error, codes = dist.min(1)
        if self.training:
            self.update(flat.detach(), codes, error.clamp_min(0))
        quantised = self.lookup(codes.view(b, h, w)).to(z.dtype)
        neg = (-dist).view(b, h, w, -1).permute(0, 3, 1, 2)
        return z + (quantised - z).detach(), codes.view(b, h, w), neg


class DiscreteVAE(nn.Module):
    """Encoder + quantiser + decoder: gumbel-softmax relaxation (the paper) or EMA vector
    quantisation (``quantizer: vq``) in training, nearest / argmax codes for use."""

    def __init__(self, config: DVAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        if config.quantizer == "vq":
            self.quantizer = VectorQuantizer(config.codebook_size, config.vq_dim, config.vq_decay,
                                             config.vq_dead_threshold)  # fmt: skip
        else:
            self.quantizer = None

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the conv weights (what inputs are cast to)."""
        return self.encoder.blocks.input.weight.dtype

    def forward(
        self,
        images: torch.Tensor,
        temperature: float = 1.0,
        kl_weight: float = 0.0,
        hard: bool = False,
        commitment: float = 0.25,
        recon_loss: str = "logit_laplace",
    ) -> DVAEOutput:
        """Training step. images: (B, C, H, W) in [0, 1]. gumbel: ``temperature``, ``kl_weight``,
        ``hard``; vq: ``commitment`` weights the pull of encoder outputs towards their codes.

        ``recon_loss``: 'logit_laplace' (the paper's NLL) or 'mse' (squared error of the predicted
        means, in mapped pixel space). On small images of flat shapes on a white background the
        NLL rewards ever-sharper scales on the background and leaves most of the codebook unused;
        MSE weights every pixel alike. ``recon_nll`` is reported either way."""
        if recon_loss not in ("logit_laplace", "mse"):
            raise ValueError(f"recon_loss={recon_loss!r}: 'logit_laplace' or 'mse'")
        _check_input(images, self.config.channels, "DiscreteVAE")
        x = map_pixels(images.float())  # fp32: the likelihood and losses are computed in fp32
        h = x.to(self.dtype)  # the conv stacks run in the module's dtype (fp16/bf16 under an engine)
        zero = x.new_zeros(())
        if self.quantizer is not None:
            z_e = self.encoder(h)
            z, _, logits = self.quantizer(z_e)
            commit = F.mse_loss(z_e.float(), z.detach().float())
            kl = zero
        else:
            logits = self.encoder(h)  # (B, K, h, w)
            z = F.gumbel_softmax(logits.float(), tau=temperature, hard=hard, dim=1).to(logits.dtype)
            kl, commit = kl_to_uniform(logits, dim=1).mean(), zero
        stats = self.decoder(z).float()  # (B, 2C, H, W)
        mu, log_b = stats.chunk(2, dim=1)
        recon_nll = logit_laplace_nll(x, mu, log_b).mean()
        fit = recon_nll if recon_loss == "logit_laplace" else F.mse_loss(torch.sigmoid(mu), x)
        # Both terms in nats per pixel dimension: scale the per-position KL by positions / pixel dims.
        n_pos, n_dim = logits[0, 0].numel(), x[0].numel()
        loss = fit + kl_weight * kl * n_pos / n_dim + commitment * commit
        recon = unmap_pixels(torch.sigmoid(mu.detach()))
        return DVAEOutput(loss, recon_nll, kl, logits, recon, commit)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels in [0, 1] -> (B, h, w) int64 codes (argmax / nearest code, no noise)."""
        _check_input(images, self.config.channels, "DiscreteVAE.encode")
        z = self.encoder(map_pixels(images.float()).to(self.dtype))
        if self.quantizer is None:
            return z.argmax(dim=1)
        b, d, h, w = z.shape
        return self.quantizer.distances(z.permute(0, 2, 3, 1).reshape(-1, d)).argmin(1).view(b, h, w)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, h, w) int codes (or (B, h*w)) -> (B, C, H, W) pixels in [0, 1]."""
        if codes.dim() == 2:
            side = math.isqrt(codes.shape[1])
            codes = codes.reshape(codes.shape[0], side, side)
        param = self.decoder.blocks.input.weight
        if self.quantizer is not None:
            z = self.quantizer.lookup(codes)
        else:
            z = F.one_hot(codes.long(), self.config.codebook_size).permute(0, 3, 1, 2)
        stats = self.decoder(z.to(param.dtype)).float()
        return unmap_pixels(torch.sigmoid(stats[:, : self.config.channels]))
