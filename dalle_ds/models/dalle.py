"""The DALL-E transformer: decoder-only, sparse attention, over [text tokens, image tokens].

Sequence layout: ``text_len`` text positions then ``image_grid**2`` image positions.
The output at position ``i`` predicts token ``i + 1``: positions ``0 .. text_len - 2``
predict text (logits over the text vocabulary plus the per-position padding tokens),
positions ``text_len - 1 .. n - 2`` predict image codes (logits over the codebook).
The first text token is given, the last position's output is unused. Logits are fp32.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import SparseAttention
from .config import DalleConfig
from .dvae import DiscreteVAE
from .init import no_weight_init
from .kv_cache import BoundedKVCache, KVCache
from .masks import layer_schedule

__all__ = [
    "DALLE",
    "DalleOutput",
    "check_token_ranges",
    "device_generator",
    "filter_logits",
    "null_text",
    "pad_text",
    "sample_logits",
]


def pad_text(tokens: list[list[int]], config: DalleConfig) -> torch.Tensor:
    """Truncate/pad token lists to ``text_len``; the pad at position i gets id ``text_vocab_size + i``."""
    out = torch.arange(config.text_len).add(config.text_vocab_size).repeat(len(tokens), 1)
    for row, toks in enumerate(tokens):
        toks = list(toks)[: config.text_len]
        bad = [t for t in toks if not 0 <= t < config.text_vocab_size]
        if bad:
            raise ValueError(f"text token ids {bad[:5]} outside [0, {config.text_vocab_size})")
        out[row, : len(toks)] = torch.tensor(toks, dtype=torch.long)
    return out


def null_text(config: DalleConfig, n: int = 1) -> torch.Tensor:
    """(n, text_len) null captions (every position padding): the condition classifier-free
    guidance contrasts with, and what caption dropout trains on."""
    return pad_text([[]] * n, config)


def check_token_ranges(
    config: DalleConfig, text: torch.Tensor | None = None, image_codes: torch.Tensor | None = None
) -> None:
    """Raise ValueError naming an out-of-range value when ``text`` ids lie outside
    ``[0, text_vocab_with_pad)`` or ``image_codes`` outside ``[0, image_vocab_size)``. Reads each
    tensor's extremes (a host sync when it lives on a GPU)."""
    ranges = (
        (text, config.text_vocab_with_pad, "text ids", " (vocab + per-position pads)"),
        (image_codes, config.image_vocab_size, "image codes", ""),
    )
    for tensor, end, what, note in ranges:
        if tensor is None or not tensor.numel():
            continue
        low, high = torch.stack([tensor.min(), tensor.max()]).tolist()
        if low < 0 or high >= end:
            raise ValueError(f"{what} must lie in [0, {end}){note}, got {low if low < 0 else high}")


class MLP(nn.Module):
    def __init__(self, config: DalleConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.fc = nn.Linear(config.d_model, hidden)
        self.proj = nn.Linear(hidden, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.proj(F.gelu(self.fc(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm residual pair: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: DalleConfig, kind: str):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = SparseAttention(
            config.d_model,
            config.n_heads,
            kind,
            config.text_len,
            config.image_grid,
            config.conv_kernel,
            config.attention_impl,
            config.conv_block_rows if kind == "conv" else config.block_rows,
            config.dropout,
        )
        self.ln_2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cache: KVCache | None = None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class DalleOutput(NamedTuple):
    """Model outputs; a NamedTuple so engines that hook module outputs (ZeRO-3) see the tensors."""

    loss: torch.Tensor | None
    text_loss: torch.Tensor | None
    image_loss: torch.Tensor | None
    text_logits: torch.Tensor | None  # (B, text_len - 1, text_vocab + text_len), fp32
    image_logits: torch.Tensor | None  # (B, image_len, image_vocab), fp32


class DALLE(nn.Module):
    """DALL-E transformer. Pass ``dvae`` to train from raw images (it is frozen). Built under
    :func:`.init.meta_modules` it has no weights until :func:`.init.materialise`; ``initialise=False``
    leaves them unset for a caller that runs :meth:`init_weights` itself (ZeRO-3, gathered)."""

    def __init__(self, config: DalleConfig, dvae: DiscreteVAE | None = None, initialise: bool = True):
        super().__init__()
        self.config = c = config
        with no_weight_init():  # no throwaway default inits: init_weights is the whole initialisation
            self.text_emb = nn.Embedding(c.text_vocab_with_pad, c.d_model)
            self.text_pos = nn.Embedding(c.text_len, c.d_model)
            self.image_emb = nn.Embedding(c.image_vocab_size, c.d_model)
            self.image_row = nn.Embedding(c.image_grid, c.d_model)
            self.image_col = nn.Embedding(c.image_grid, c.d_model)
            self.drop = nn.Dropout(c.dropout)
            self.blocks = nn.ModuleList(Block(c, kind) for kind in layer_schedule(c.n_layers))
            self.ln_f = nn.LayerNorm(c.d_model, eps=c.layer_norm_eps)
            if not c.tie_embeddings:
                self.text_head = nn.Linear(c.d_model, c.text_vocab_with_pad, bias=False)
                self.image_head = nn.Linear(c.d_model, c.image_vocab_size, bias=False)
        if initialise and hasattr(self.text_emb.weight, "ds_id"):  # partitioned as built (deepspeed.zero.Init)
            raise ValueError("DALLE built under deepspeed.zero.Init: its parameters are partitioned; pass "
                             "initialise=False and call init_weights(around=...) with each module's parameters "
                             "gathered, as DalleTrainer does")
        if initialise and not self.text_emb.weight.is_meta:
            self.init_weights()
        self.dvae = None
        if dvae is not None:
            self.set_dvae(dvae)

    @torch.no_grad()
    def init_weights(self, around: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None) -> None:
        """The model's whole initialisation: Linear/Embedding weights N(0, init_std), residual output
        projections (``*.proj``) std / sqrt(2 n_layers) (GPT-2), LayerNorm gains 1, biases 0 (not the dVAE).
        Modules go one at a time in registration order; values are drawn in fp32 on the CPU from the
        global generator and copied in, so they depend on the seed alone, not on the parameters' device
        or dtype. ``around(module)``: a context manager around each module's init (ZeRO-3 gathers its
        partitioned parameters; :func:`.init.materialise` allocates a meta-built module on its device)."""
        std = self.config.init_std
        scratch = torch.empty(0, device="cpu")  # CPU fp32 values of one tensor at a time, reused

        def fill(param: torch.Tensor, initialiser, **kwargs) -> None:
            nonlocal scratch
            if param.device.type == "cpu" and param.dtype == torch.float32:
                initialiser(param, **kwargs)  # drawn in place: the same values as through the scratch
                return
            if scratch.numel() < param.numel():
                scratch = torch.empty(param.numel(), dtype=torch.float32, device="cpu")
            param.copy_(initialiser(scratch[: param.numel()].view(param.shape), **kwargs))  # rounds like .to()

        for name, module in self.named_modules():
            if name.split(".")[0] == "dvae" or next(module.parameters(recurse=False), None) is None:
                continue
            with around(module) if around is not None else contextlib.nullcontext():
                if isinstance(module, (nn.Linear, nn.Embedding)):
                    scale = math.sqrt(2 * self.config.n_layers) if name.endswith("proj") else 1.0
                    fill(module.weight, nn.init.normal_, std=std / scale)
                elif isinstance(module, nn.LayerNorm):
                    fill(module.weight, nn.init.ones_)
                else:
                    raise TypeError(f"init_weights has no rule for {name} ({type(module).__name__})")
                if getattr(module, "bias", None) is not None:
                    fill(module.bias, nn.init.zeros_)

    def set_dvae(self, dvae: DiscreteVAE) -> None:
        """Attach a frozen image tokenizer (a dVAE or a VQGAN) so ``forward`` accepts raw images."""
        self.check_dvae(dvae)
        dvae.requires_grad_(False).eval()
        self.dvae = dvae

    def check_dvae(self, dvae: DiscreteVAE) -> None:
        """Raise if the tokenizer's grid or codebook does not fit this model."""
        name = dvae.config.title or type(dvae).__name__
        if dvae.config.grid_size != self.config.image_grid:
            raise ValueError(
                f"{name} grid {dvae.config.grid_size} != DalleConfig.image_grid={self.config.image_grid}"
            )
        if dvae.config.codebook_size != self.config.image_vocab_size:
            raise ValueError(
                f"{name} codebook {dvae.config.codebook_size} != "
                f"DalleConfig.image_vocab_size={self.config.image_vocab_size}"
            )

    def train(self, mode: bool = True):
        super().train(mode)
        if self.dvae is not None:
            self.dvae.eval()  # frozen tokenizer: never in training mode
        return self

    def external_parameters(self) -> list[nn.Parameter]:
        """Parameters this module's forward reads directly although a submodule owns them (the
        tied unembeddings): parameter-sharding engines (ZeRO-3) must gather them for it."""
        return [self.text_emb.weight, self.image_emb.weight] if self.config.tie_embeddings else []

    def _unembed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.tie_embeddings:
            return self.text_emb.weight, self.image_emb.weight
        return self.text_head.weight, self.image_head.weight

    def embed(self, text: torch.Tensor, image_codes: torch.Tensor) -> torch.Tensor:
        """text (B, T) ids incl. padding ids, image_codes (B, L <= N) -> (B, T + L, d_model)."""
        c = self.config
        B, T = text.shape
        if T != c.text_len:
            raise ValueError(f"text has {T} positions, model built for text_len={c.text_len}")
        h_text = self.text_emb(text) + self.text_pos.weight[None]
        return self.drop(torch.cat([h_text, self._image_embed(image_codes, 0)], dim=1))

    def _image_embed(self, codes: torch.Tensor, start: int) -> torch.Tensor:
        """Embeddings of image codes (B, m) at raster positions start .. start + m - 1."""
        g = self.config.image_grid
        pos = torch.arange(start, start + codes.shape[1], device=codes.device)
        return self.image_emb(codes) + self.image_row(pos // g) + self.image_col(pos % g)

    def hidden_states(self, text: torch.Tensor, image_codes: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states (B, T + L, d_model) for text and the first L <= N image codes."""
        h = self.embed(text, image_codes)
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)

    @torch.no_grad()
    def next_image_logits(self, text: torch.Tensor, image_prefix: torch.Tensor) -> torch.Tensor:
        """fp32 logits (B, image_vocab) of image token L given text and the first L codes (L < N).

        Recomputes the whole prefix (no cache): simple and exact, for short demos and tests.
        """
        L = image_prefix.shape[1]
        if L >= self.config.image_len:
            raise ValueError(f"image_prefix has {L} codes: nothing left to predict (image_len={self.config.image_len})")
        h = self.hidden_states(text, image_prefix.long())[:, -1]
        return F.linear(h.float(), self._unembed_weights()[1].float())

    @torch.no_grad()
    def generate(
        self,
        text: torch.Tensor,
        top_k: int = 0,
        top_p: float = 1.0,
        temperature: float = 1.0,
        generator: torch.Generator | None = None,
        prime: torch.Tensor | None = None,
        use_cache: bool = True,
        num_samples: int = 1,
        cache: str = "full",
        cond_scale: float = 1.0,
    ) -> torch.Tensor:
        """Sample image codes (B * num_samples, N) token by token given padded text (B, text_len).

        ``prime`` (B, L0): the first L0 codes (e.g. the top rows of an encoded image), kept verbatim.
        ``top_k`` / ``top_p`` restrict each draw (see :func:`filter_logits`). ``num_samples``: that
        many candidates per text row (rows ``i * num_samples + j``), which share one prefill of the
        text and primed codes. With ``use_cache`` every layer keeps its keys and values (``cache``:
        'full' keeps every position, 'bounded' only what each layer kind can still see, see
        :mod:`dalle_ds.models.kv_cache`), so each step runs one position through the network;
        without it each step recomputes the whole prefix (the reference the caches are tested against).

        ``cond_scale`` != 1: classifier-free guidance. Every row also runs with the null caption (all
        padding, what training with ``--caption-dropout`` shows the model), and each draw uses
        ``null + cond_scale * (text - null)`` logits: 0 samples as the null caption, 1 (default,
        no second pass) as the caption, > 1 pushes further towards what the caption changes.

        The loop runs on the text's device and never reads a tensor back to the host: each draw is
        :func:`sample_logits`. ``generator`` on that device is used as is; one on another device
        (e.g. a CPU generator for a CUDA model) seeds a generator on this device from one draw.
        """
        c = self.config
        B, device = text.shape[0], text.device
        if num_samples < 1 or cache not in ("full", "bounded"):
            raise ValueError(f"num_samples={num_samples} must be >= 1 and cache={cache!r} 'full' or 'bounded'")
        L0 = 0
        if prime is not None:
            if prime.dim() != 2 or prime.shape[0] != B or prime.shape[1] >= c.image_len:
                raise ValueError(f"prime must be (B={B}, L < {c.image_len}), got {tuple(prime.shape)}")
            L0 = prime.shape[1]
        codes = torch.zeros(B * num_samples, c.image_len, dtype=torch.long, device=device)
        if L0:
            codes[:, :L0] = prime.to(device).long().repeat_interleave(num_samples, 0)
        generator = device_generator(generator, device)
        guided = cond_scale != 1
        if guided:  # rows [text; null caption]: the null half sees the same codes
            text = torch.cat([text, null_text(c, B).to(device)])

        def draw(logits):
            if guided:
                cond, null = logits.chunk(2)
                logits = null + cond_scale * (cond - null)
            return sample_logits(logits, top_k, top_p, temperature, generator)[:, 0]

        def rows(new):  # the codes of every row of the network's batch
            return torch.cat([new, new]) if guided else new

        if not use_cache:
            text = text.repeat_interleave(num_samples, 0)
            for i in range(L0, c.image_len):
                codes[:, i] = draw(self.next_image_logits(text, rows(codes[:, :i])))
            return codes
        caches = [(KVCache if cache == "full" else BoundedKVCache)() for _ in self.blocks]
        w_image = self._unembed_weights()[1].float()
        h = self.embed(text, rows(codes[::num_samples, :L0]))  # prefill: text and primed codes in one pass
        for i in range(L0, c.image_len):
            for block, kv in zip(self.blocks, caches, strict=True):
                h = block(h, kv)
            if i == L0 and num_samples > 1:  # candidates share the prefill: repeat its cache
                h = h[:, -1:].repeat_interleave(num_samples, 0)
                for kv in caches:
                    kv.expand(num_samples)
            codes[:, i] = draw(F.linear(self.ln_f(h[:, -1]).float(), w_image))
            h = self.drop(self._image_embed(rows(codes[:, i : i + 1]), i))
        return codes

    def forward(
        self,
        text: torch.Tensor,
        image_codes: torch.Tensor | None = None,
        images: torch.Tensor | None = None,
        return_logits: bool = False,
        check_inputs: bool = True,
    ) -> DalleOutput:
        """text: (B, text_len) ids; image_codes: (B, grid, grid) or (B, grid**2); or images (B, 3, H, W).

        ``check_inputs`` checks the ids' ranges (:func:`check_token_ranges`: a host read, a sync on a
        GPU); the trainer passes False and checks its batches on the host instead."""
        c = self.config
        if (image_codes is None) == (images is None):
            raise ValueError("pass exactly one of image_codes and images")
        if images is not None:
            if self.dvae is None:
                raise ValueError("forward(images=...) needs a dVAE: DALLE(config, dvae=...) or set_dvae()")
            image_codes = self.dvae.encode(images)
        image_codes = image_codes.reshape(image_codes.shape[0], -1).long()
        if image_codes.shape[1] != c.image_len:
            raise ValueError(f"image_codes has {image_codes.shape[1]} tokens, expected image_grid**2={c.image_len}")
        if check_inputs:
            check_token_ranges(c, text, image_codes)

        h = self.hidden_states(text, image_codes)
        T = c.text_len
        w_text, w_image = self._unembed_weights()
        # (B, T-1, V_text) and (B, N, V_image); the last position predicts nothing.
        text_logits = F.linear(h[:, : T - 1].float(), w_text.float())
        image_logits = F.linear(h[:, T - 1 : -1].float(), w_image.float())
        text_loss = F.cross_entropy(text_logits.transpose(1, 2), text[:, 1:])
        image_loss = F.cross_entropy(image_logits.transpose(1, 2), image_codes)
        loss = c.text_loss_weight * text_loss + (1 - c.text_loss_weight) * image_loss
        if return_logits:
            return DalleOutput(loss, text_loss, image_loss, text_logits, image_logits)
        return DalleOutput(loss, text_loss, image_loss, None, None)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits (B, V) with everything outside the top ``top_k`` and outside the smallest set of
    most likely tokens whose probability reaches ``top_p`` (nucleus) set to -inf; 0 / 1.0 = off.
    The most likely token always stays."""
    if top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"top_k={top_k} must be >= 0 and top_p={top_p} in (0, 1]")
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # mass of better tokens
        drop = before >= top_p  # keep a token while the better ones have not reached top_p yet
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def sample_logits(
    logits: torch.Tensor,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token (B, 1) per row of ``logits`` (B, V), drawn on their device with no host sync.

    The exponential race: ``argmax(p / E)`` with ``E ~ Exp(1)`` i.i.d. picks token i with
    probability ``p_i`` (the Gumbel-max trick in probability space). It is what ``torch.multinomial``
    does for one sample, minus its checks that read the probabilities back to the host, so on the
    CPU the tokens equal ``torch.multinomial(p, 1, generator=generator)`` for the same generator state.
    """
    probs = filter_logits(logits / max(temperature, 1e-6), top_k, top_p).softmax(-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return probs.div_(race).argmax(-1, keepdim=True)


def device_generator(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """``generator`` if it lives on ``device`` (or is None: the device's default), else a new
    generator there seeded from one draw of ``generator`` (deterministic for its seed)."""
    device = torch.device(device)
    if generator is None or generator.device == device:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)
