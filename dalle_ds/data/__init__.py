"""Data: streaming image-text pairs (``datasets``), the caption tokenizer, the synthetic shapes set.

Modules, each depending only on those before it: :mod:`.config` (DataConfig, bad-input counters),
:mod:`.transforms` (one example to a tensor), :mod:`.shards` (reading one shard), :mod:`.sources`
(a source's shards, its captions), :mod:`.deal` (which shards each (rank, worker) slot reads; re-dealing
an epoch's rest to another layout), :mod:`.stream` (the distributed, resumable batch stream).
"""

from .config import REASONS, BadSample, DataConfig
from .deal import redeal_stream_states
from .sources import iter_captions, open_source
from .stream import StreamLoader
from .transforms import caption_problem, crop_tensor, is_english, paper_crop, read_image, to_rgb

__all__ = [
    "REASONS",
    "BadSample",
    "DataConfig",
    "StreamLoader",
    "caption_problem",
    "crop_tensor",
    "is_english",
    "iter_captions",
    "open_source",
    "paper_crop",
    "read_image",
    "redeal_stream_states",
    "to_rgb",
]
