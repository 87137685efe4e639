"""Model configuration: dataclasses, named presets and YAML round trips.

Every model setting has exactly one default, in the dataclass below. Presets are
named sets of overrides on top of those defaults; YAML files hold the same fields.
Configs are validated on construction and errors name the offending field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config_base import PRESET_LOOKUP, ConfigError, _ConfigBase, _require
from .vqgan_config import VQGANConfig

__all__ = [
    "ConfigError",
    "DVAEConfig",
    "DalleConfig",
    "PRESETS",
    "CONFIG_TYPES",
    "TOKENIZER_KINDS",
    "VQGANConfig",
    "config_from_dict",
    "get_preset",
    "load_config",
    "save_config",
]


@dataclass(frozen=True)
class DVAEConfig(_ConfigBase):
    """The discrete VAE (image tokenizer), in the architecture of OpenAI's dVAE.

    The encoder has ``group_count`` groups of residual blocks of widths
    ``n_hid * 2**g`` and halves the resolution after every group but the last,
    so the code grid is ``image_size / 2**(group_count - 1)`` on a side.
    """

    image_size: int = 256
    """Side of the square input image in pixels."""
    channels: int = 3
    """Image channels (RGB)."""
    codebook_size: int = 8192
    """Number of discrete codes K."""
    n_hid: int = 256
    """Base width of the residual blocks (must be a multiple of 4)."""
    n_init: int = 128
    """Width the decoder's 1x1 input conv maps the one-hot codes to."""
    n_blk_per_group: int = 2
    """Residual blocks per group."""
    group_count: int = 4
    """Groups in encoder and decoder; downsampling factor is 2**(group_count-1)."""
    quantizer: str = "gumbel"
    """'gumbel': the paper's gumbel-softmax relaxation over K encoder logits, one-hot codes into the
    decoder (OpenAI's layout). 'vq': straight-through vector quantisation against a K x vq_dim
    codebook kept as an EMA of the encoder outputs, with dead codes restarted from the batch."""
    vq_dim: int = 64
    """'vq' only: width of the encoder output and of the codebook vectors."""
    vq_decay: float = 0.99
    """'vq' only: EMA decay of the codebook statistics."""
    vq_dead_threshold: float = 1.0
    """'vq' only: a code whose EMA assignment count (per update, summed over ranks) falls below
    this is restarted at a random encoder output of the current batch."""

    kind, title = "dvae", "dVAE"

    def __post_init__(self):
        c = type(self)
        _require(self.image_size >= 1, c, "image_size", self.image_size, "must be positive")
        _require(self.channels >= 1, c, "channels", self.channels, "must be positive")
        _require(self.codebook_size >= 2, c, "codebook_size", self.codebook_size, "must be >= 2")
        _require(
            self.n_hid >= 4 and self.n_hid % 4 == 0,
            c,
            "n_hid",
            self.n_hid,
            "must be a positive multiple of 4 (blocks use n_out/4 hidden channels)",
        )
        _require(self.n_init >= 1, c, "n_init", self.n_init, "must be positive")
        _require(self.n_blk_per_group >= 1, c, "n_blk_per_group", self.n_blk_per_group, "must be >= 1")
        _require(self.group_count >= 1, c, "group_count", self.group_count, "must be >= 1")
        _require(self.quantizer in ("gumbel", "vq"), c, "quantizer", self.quantizer, "must be 'gumbel' or 'vq'")
        _require(self.vq_dim >= 1, c, "vq_dim", self.vq_dim, "must be positive")
        _require(0.0 < self.vq_decay < 1.0, c, "vq_decay", self.vq_decay, "must be in (0, 1)")
        _require(self.vq_dead_threshold >= 0, c, "vq_dead_threshold", self.vq_dead_threshold, "must be >= 0")
        _require(
            self.image_size % self.downsample == 0,
            c,
            "image_size",
            self.image_size,
            f"must be divisible by the downsampling factor {self.downsample} (group_count={self.group_count})",
        )

    @property
    def downsample(self) -> int:
        return 2 ** (self.group_count - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample


@dataclass(frozen=True)
class DalleConfig(_ConfigBase):
    """The DALL-E decoder-only sparse transformer over [text tokens, image tokens]."""

    text_len: int = 256
    """Text positions; captions are padded/truncated to this length."""
    text_vocab_size: int = 16384
    """BPE vocabulary; ids text_vocab_size + i are the padding tokens of position i."""
    image_grid: int = 32
    """Side of the image-token grid (the dVAE's grid_size)."""
    image_vocab_size: int = 8192
    """dVAE codebook size."""
    d_model: int = 3968
    """Residual stream width."""
    n_layers: int = 64
    """Attention layers (each followed by an MLP); the last one is the conv layer."""
    n_heads: int = 62
    """Attention heads; d_model must be divisible by it."""
    mlp_ratio: int = 4
    """MLP hidden width as a multiple of d_model."""
    conv_kernel: int = 11
    """Side k of the causal k x k neighbourhood of the conv attention layer (odd)."""
    dropout: float = 0.0
    """Dropout on residual branches and embeddings."""
    text_loss_weight: float = 1.0 / 8.0
    """Weight of the text cross-entropy (the image one gets 1 - this)."""
    attention_impl: str = "auto"
    """'block' (sparse blocks, never an n x n score matrix), 'dense' (SDPA with the full mask, the
    reference), 'flex' (PyTorch's FlexAttention with a block mask; no backward on the CPU) or 'auto',
    which picks per forward from the input's device and seq_len: on the CPU 'dense' for seq_len <=
    128 and 'block' above (where each was measured faster, docs/benchmarks.md, "Short sequences"),
    on CUDA and other devices 'block' (about 4x fewer scores at the paper's size; not yet timed on a
    GPU); never 'flex' until a GPU has timed it. The rule:
    ``dalle_ds.models.attention.resolve_attention_impl``."""
    block_rows: int = 2
    """Image rows per query tile of row/column layers in the block attention implementation."""
    conv_block_rows: int = 4
    """Image rows per query tile of the conv layer (its window reaches conv_kernel // 2 rows up)."""
    tie_embeddings: bool = True
    """Unembed with the token embedding matrices (text and image) transposed."""
    layer_norm_eps: float = 1e-5
    """Epsilon of every LayerNorm."""
    init_std: float = 0.02
    """Std of the normal init; residual output projections are scaled by 1/sqrt(2 n_layers)."""

    kind, title = "dalle", "DALL-E"

    def __post_init__(self):
        c = type(self)
        for name in (
            "text_len",
            "text_vocab_size",
            "image_grid",
            "image_vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "mlp_ratio",
            "block_rows",
            "conv_block_rows",
        ):
            value = getattr(self, name)
            _require(isinstance(value, int) and value >= 1, c, name, value, "must be a positive integer")
        _require(self.text_len >= 2, c, "text_len", self.text_len, "must be >= 2")
        _require(
            self.d_model % self.n_heads == 0,
            c,
            "d_model",
            self.d_model,
            f"must be divisible by n_heads={self.n_heads}",
        )
        _require(
            self.conv_kernel >= 1 and self.conv_kernel % 2 == 1,
            c,
            "conv_kernel",
            self.conv_kernel,
            "must be a positive odd integer",
        )
        _require(0.0 <= self.dropout < 1.0, c, "dropout", self.dropout, "must be in [0, 1)")
        _require(
            0.0 <= self.text_loss_weight <= 1.0,
            c,
            "text_loss_weight",
            self.text_loss_weight,
            "must be in [0, 1]",
        )
        _require(
            self.attention_impl in ("auto", "block", "dense", "flex"),
            c,
            "attention_impl",
            self.attention_impl,
            "must be one of 'auto', 'block', 'dense', 'flex'",
        )
        _require(self.layer_norm_eps > 0, c, "layer_norm_eps", self.layer_norm_eps, "must be > 0")
        _require(self.init_std > 0, c, "init_std", self.init_std, "must be > 0")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def image_len(self) -> int:
        return self.image_grid**2

    @property
    def seq_len(self) -> int:
        return self.text_len + self.image_len

    @property
    def text_vocab_with_pad(self) -> int:
        """Text embedding rows: the BPE vocabulary plus one padding token per position."""
        return self.text_vocab_size + self.text_len


_TINY = {
    "text_len": 16,
    "text_vocab_size": 256,
    "image_grid": 8,
    "image_vocab_size": 128,
    "d_model": 128,
    "n_layers": 4,
    "n_heads": 4,
    "conv_kernel": 5,
}

# Named presets: overrides on the dataclass defaults (which are the paper's 12B model).
PRESETS: dict[str, tuple[type, dict[str, Any]]] = {
    # Paper Table 1 and section 4 (docs/design.md, "Model sizes"): 64 layers, head size 64.
    "dalle-12b": (DalleConfig, {}),
    "dalle-5.6b": (DalleConfig, {"d_model": 2688, "n_heads": 42}),
    "dalle-2.8b": (DalleConfig, {"d_model": 1920, "n_heads": 30}),
    "dalle-1.3b": (DalleConfig, {"d_model": 1536, "n_heads": 24, "n_layers": 44}),
    # Small models for CPU tests and demos.
    "dalle-tiny": (DalleConfig, _TINY),
    "dalle-demo": (DalleConfig, {**_TINY, "image_grid": 9}),
    "dalle-small": (
        DalleConfig,
        {
            "text_len": 32,
            "text_vocab_size": 1024,
            "image_grid": 16,
            "image_vocab_size": 512,
            "d_model": 256,
            "n_layers": 8,
            "n_heads": 8,
            "conv_kernel": 7,
        },
    ),
    "dvae-paper": (DVAEConfig, {}),
    # taming-transformers' public f16 VQGANs at 256 px (16x16 codes): the ImageNet models' layout.
    "vqgan-f16-1024": (VQGANConfig, {}),
    "vqgan-f16-16384": (VQGANConfig, {"n_embed": 16384}),
    # Tests and demos: 32 px, 8x8 codes, attention at the 8x8 level.
    "vqgan-tiny": (
        VQGANConfig,
        {"image_size": 32, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8],
         "z_channels": 16, "embed_dim": 16, "n_embed": 128},
    ),  # fmt: skip
    "dvae-tiny": (
        DVAEConfig,
        {"image_size": 32, "codebook_size": 128, "n_hid": 32, "n_init": 32, "n_blk_per_group": 1, "group_count": 3},
    ),
    # The demo's pair: 36 px images, so each cell of the synthetic set's 3 x 3 layout is exactly
    # 3 x 3 codes and a shape gets the same codes wherever it is drawn; vq, because gumbel training
    # collapses onto a fraction of the codebook in a few minutes (docs/design.md, "Small runs: gumbel vs VQ").
    "dvae-demo": (
        DVAEConfig,
        {
            "image_size": 36,
            "codebook_size": 128,
            "n_hid": 32,
            "n_init": 32,
            "n_blk_per_group": 1,
            "group_count": 3,
            "quantizer": "vq",
            "vq_dim": 64,
        },
    ),
    "dvae-small": (
        DVAEConfig,
        {"image_size": 64, "codebook_size": 512, "n_hid": 64, "n_init": 64, "n_blk_per_group": 1, "group_count": 3},
    ),
}


def _lookup_preset(name: str) -> tuple[type, dict[str, Any]]:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}") from None


PRESET_LOOKUP.append(_lookup_preset)


def get_preset(name: str) -> DalleConfig | DVAEConfig:
    """The config of a named preset."""
    cls, values = _lookup_preset(name)
    return cls.from_dict(values, source=f"preset {name!r}")


CONFIG_TYPES = {c.kind: c for c in (DVAEConfig, VQGANConfig, DalleConfig)}
"""``model_type`` -> config class."""
TOKENIZER_KINDS = ("dvae", "vqgan")
"""The ``model_type`` of the image tokenizers."""


def config_from_dict(data: dict, source: str, kinds=tuple(CONFIG_TYPES)) -> DalleConfig | DVAEConfig | VQGANConfig:
    """The config a dict with a ``model_type`` (one of ``kinds``) describes; ``source`` names it in errors."""
    kind = data.get("model_type")
    if kind not in kinds:
        raise ConfigError(f"{source}: model_type={kind!r}, expected one of {sorted(kinds)}")
    return CONFIG_TYPES[kind].from_dict(data, source=source)


def load_config(name_or_path: str | Path, **overrides) -> DalleConfig | DVAEConfig:
    """A preset name, or a YAML file written by :func:`save_config` (``model_type`` picks the class)."""
    text = str(name_or_path)
    if text in PRESETS or not text.endswith((".yaml", ".yml")):
        cls, values = _lookup_preset(text)
        return cls.from_dict({**values, **overrides}, source=f"preset {text!r}")
    path = Path(text)
    if not path.is_file():
        raise ConfigError(f"config file {text!r} does not exist")
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return config_from_dict({**data, **overrides}, str(path))


def save_config(config: DalleConfig | DVAEConfig, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(config.to_dict(), f, sort_keys=False)
