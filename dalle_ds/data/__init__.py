"""Data: streaming image-text pairs (``datasets``), the caption tokenizer, the synthetic shapes set."""

from .stream import REASONS, DataConfig, StreamLoader, iter_captions

__all__ = ["REASONS", "DataConfig", "StreamLoader", "iter_captions"]
