"""dalle-ds: train DALL-E-style text-to-image models with DeepSpeed."""

from .inference.serialization import load_dvae, load_model, save_model
from .models.attention import SparseAttention, block_attention, dense_attention, sparse_attention
from .models.config import PRESETS, ConfigError, DalleConfig, DVAEConfig, get_preset, load_config, save_config
from .models.dalle import DALLE, DalleOutput, pad_text
from .models.dvae import Decoder, DiscreteVAE, Encoder, map_pixels, unmap_pixels
from .models.masks import attention_mask, layer_schedule

__version__ = "0.1.0"

__all__ = [
    "DALLE",
    "PRESETS",
    "ConfigError",
    "DVAEConfig",
    "DalleConfig",
    "DalleOutput",
    "Decoder",
    "DiscreteVAE",
    "Encoder",
    "SparseAttention",
    "attention_mask",
    "block_attention",
    "dense_attention",
    "get_preset",
    "layer_schedule",
    "load_config",
    "load_dvae",
    "load_model",
    "map_pixels",
    "pad_text",
    "save_config",
    "save_model",
    "sparse_attention",
    "unmap_pixels",
]
