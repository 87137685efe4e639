"""The VQGAN tokenizer's config (its presets are with the others in :mod:`.config`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .config_base import _ConfigBase, _require

__all__ = ["VQGANConfig"]


@dataclass(frozen=True)
class VQGANConfig(_ConfigBase):
    """A VQGAN image tokenizer in taming-transformers' ``VQModel`` layout (Esser et al. 2021): a
    convolutional encoder/decoder with ``len(ch_mult) - 1`` halvings, self-attention at the
    resolutions in ``attn_resolutions``, and a codebook of ``n_embed`` vectors of ``embed_dim``.
    The field names are taming's ``ddconfig`` / ``VQModel`` parameters (``resolution`` is
    ``image_size``, ``in_channels`` and ``out_ch`` are ``channels``)."""

    image_size: int = 256
    """Training resolution (taming's ``resolution``); attention levels are counted from it. Any
    size divisible by the downsampling factor encodes."""
    channels: int = 3
    ch: int = 128
    """Base width; level i has ``ch * ch_mult[i]`` channels."""
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    """Feature-map sides (at ``image_size``) whose levels get self-attention blocks."""
    z_channels: int = 256
    embed_dim: int = 256
    n_embed: int = 1024
    dropout: float = 0.0
    beta: float = 0.25
    """Commitment weight of the codebook loss."""
    legacy: bool = True
    """taming's loss order: True (its ``VectorQuantizer`` and ``legacy=True``) weights the codebook
    term by ``beta``, False the commitment term (``VectorQuantizer2(legacy=False)``)."""
    remap_codes: int = 0
    """0, or the number of codes a taming ``remap`` file kept (the ``quantize.used`` buffer): the
    transformer then sees ``remap_codes`` codes (+1 with ``unknown_index: extra``)."""
    unknown_index: str | int = "random"
    """With ``remap_codes``: what a code outside the kept set becomes ('random', 'extra' or an index)."""
    quantizer: str = "learned"
    """'learned': taming's codebook, trained by the codebook loss (``quantize.embedding.weight``);
    'ema': an EMA codebook with dead-code restarts (the dVAE's ``vq`` quantiser, ``quantize.ema.*``),
    which keeps far more of the codebook in use on small runs; its loss is the commitment term alone."""
    ema_decay: float = 0.99
    """'ema' only: decay of the codebook statistics."""
    dead_threshold: float = 1.0
    """'ema' only: a code whose EMA assignment count (summed over ranks) falls below this restarts."""

    kind, title = "vqgan", "VQGAN"

    def __post_init__(self):
        c = type(self)
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(self.attn_resolutions))
        for name in ("image_size", "channels", "ch", "num_res_blocks", "z_channels", "embed_dim"):
            _require(getattr(self, name) >= 1, c, name, getattr(self, name), "must be positive")
        _require(self.n_embed >= 2, c, "n_embed", self.n_embed, "must be >= 2")
        _require(
            len(self.ch_mult) >= 1 and all(m >= 1 for m in self.ch_mult), c, "ch_mult", self.ch_mult,
            "must be a non-empty list of positive multipliers",
        )  # fmt: skip
        _require(
            all(self.ch * m % 32 == 0 for m in (1, *self.ch_mult)), c, "ch", self.ch,
            "ch * each ch_mult must be a multiple of 32 (GroupNorm's 32 groups)",
        )  # fmt: skip
        _require(
            self.image_size % self.downsample == 0, c, "image_size", self.image_size,
            f"must be divisible by the downsampling factor {self.downsample} (len(ch_mult)={len(self.ch_mult)})",
        )  # fmt: skip
        _require(0 <= self.remap_codes <= self.n_embed, c, "remap_codes", self.remap_codes, "must be in [0, n_embed]")
        _require(self.quantizer in ("learned", "ema"), c, "quantizer", self.quantizer, "must be 'learned' or 'ema'")
        _require(0.0 < self.ema_decay < 1.0, c, "ema_decay", self.ema_decay, "must be in (0, 1)")
        _require(
            not (self.quantizer == "ema" and self.remap_codes), c, "remap_codes", self.remap_codes,
            "a remapped codebook is taming's learned one: quantizer must be 'learned'",
        )  # fmt: skip
        index_ok = isinstance(self.unknown_index, int) and self.unknown_index >= 0
        _require(
            self.unknown_index in ("random", "extra") or index_ok,
            c, "unknown_index", self.unknown_index, "must be 'random', 'extra' or a non-negative index",
        )  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        return {**data, "ch_mult": list(self.ch_mult), "attn_resolutions": list(self.attn_resolutions)}

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def codebook_size(self) -> int:
        """Codes the transformer sees: ``n_embed``, or the remapped set (+1 for 'extra')."""
        if not self.remap_codes:
            return self.n_embed
        return self.remap_codes + (1 if self.unknown_index == "extra" else 0)
