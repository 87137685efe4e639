"""Image tokenizers and which class each config builds.

An image tokenizer is any model with a ``config`` that has ``image_size``, ``channels``,
``grid_size`` and ``codebook_size``, an ``encode(images)`` taking (B, C, H, W) pixels in [0, 1] to
(B, h, w) int64 codes, and a ``decode(codes)`` taking them back to pixels in [0, 1]: the paper's
dVAE (:class:`~dalle_ds.models.dvae.DiscreteVAE`, ``model_type: dvae``) and the VQGAN
(:class:`~dalle_ds.models.vqgan.VQGAN`, ``model_type: vqgan``). Every stage that turns images into
codes or back (the DALL-E trainer's ``--dvae``, ``encode_images.py``, sampling, evaluation, export,
pipelines) takes either; their folders' ``config.json`` says which.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from .config import DalleConfig, DVAEConfig, VQGANConfig
from .dalle import DALLE
from .dvae import DiscreteVAE
from .vqgan import VQGAN

__all__ = ["MODEL_CLASSES", "TOKENIZER_CLASSES", "ImageTokenizer", "build_model", "is_tokenizer"]

MODEL_CLASSES: dict[type, type[nn.Module]] = {DalleConfig: DALLE, DVAEConfig: DiscreteVAE, VQGANConfig: VQGAN}
TOKENIZER_CLASSES = (DiscreteVAE, VQGAN)


@runtime_checkable
class ImageTokenizer(Protocol):
    config: DVAEConfig | VQGANConfig

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, codes: torch.Tensor) -> torch.Tensor: ...


def build_model(config: DalleConfig | DVAEConfig | VQGANConfig) -> nn.Module:
    """The model a config describes (on the current default device)."""
    try:
        return MODEL_CLASSES[type(config)](config)
    except KeyError:
        raise TypeError(f"no model class for {type(config).__name__}") from None


def is_tokenizer(model) -> bool:
    return isinstance(model, TOKENIZER_CLASSES)
