"""What a stream is configured with (:class:`DataConfig`), the columns and tar member types it
recognises, and the bad-input vocabulary.

Bad input is skipped and counted per example, never fatal, and never costs a good example: see
:data:`REASONS` for every counter.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

__all__ = ["REASONS", "BadSample", "DataConfig"]

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img")
CAPTION_COLUMNS = ("txt", "caption", "text", "json")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Tar members that are images. Any of them is decoded by its content, so a shard may mix them."""
CAPTION_EXTENSIONS = ("txt", "caption", "text", "json")
METADATA_EXTENSIONS = frozenset({"json", "cls", "cls2", "id", "key", "url", "meta", "index"})
"""Tar members that travel with an example without being used (``json`` is a caption only when
the example has no ``txt``); any other extension is counted as ``unexpected_extension``."""
CODES_COLUMN = "codes"
REASONS = {
    "samples": "delivered",
    "corrupt_image": "image bytes that do not decode (broken, truncated, not an image whatever the extension)",
    "empty_image": "an image member of 0 bytes",
    "decompression_bomb": "more pixels than max_pixels (from the header, before decoding)",
    "aspect_ratio": "aspect ratio outside [min_aspect, max_aspect]",
    "missing_image": "a caption without an image member (or a Parquet row without image bytes)",
    "missing_image_file": "a Parquet/image-folder row whose image path cannot be read",
    "missing_caption": "an image member without a caption member",
    "unexpected_extension": "a tar member whose extension is no image, caption or metadata type (counted per member)",
    "caption_not_utf8": "a caption that is not valid UTF-8",
    "binary_caption": "a caption with control characters (binary data)",
    "bad_json": "a .json caption that is not JSON (or not an object)",
    "json_without_caption": "a .json caption without a string caption or text key",
    "empty_caption": "an empty or blank caption",
    "short_caption": "fewer than min_caption_words words",
    "boilerplate_caption": "a caption like 'IMG_1234.jpg' or 'untitled'",
    "non_english": "a caption the language filter (english_only) did not find English",
    "missing_codes": "a codes row without codes",
    "bad_shards": "a shard that cannot be opened or parsed at all (not a tar, not Parquet, missing columns)",
    "truncated_shards": "a tar cut short: everything before the cut is delivered, a partial example is lost",
    "dropped_tail_samples": "a worker's last partial batch (drop_last)",
    "dropped_at_epoch_end": "batches left when another rank ran dry",
}


class BadSample(Exception):
    """An example to skip; ``reason`` names the counter it goes to (None: already counted)."""

    def __init__(self, reason: str | None):
        super().__init__(reason)
        self.reason = reason


@dataclass
class DataConfig:
    source: str
    """Hub id, a folder (image folder, or one holding .tar / .parquet shards), a file or a glob."""
    image_column: str | None = None
    """Default: the first of jpg, jpeg, png, webp, image, img that the example (tar) or file has."""
    caption_column: str | None = None
    """Default: the first of txt, caption, text, json (json: its "caption" or "text" key)."""
    split: str = "train"
    image_size: int = 256
    augment: bool = True
    """The paper's near-centre square crop, resize in [S, 9/8 S], random S crop; else centre crop."""
    min_aspect: float = 0.5
    max_aspect: float = 2.0
    min_caption_words: int = 2
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485
    """Larger images are skipped as decompression bombs (checked from the header, before decoding)."""
    shuffle_buffer: int = 1000
    """Examples are shuffled within each shard through a buffer of this many."""
    seed: int = 0
    drop_last: bool = True
    """Drop each worker's last partial batch (training); False keeps it (encoding a whole set)."""
    english_only: bool = False
    """The paper's language filter: skip captions not detected as English (py3langid, whose model
    ships in its wheel), counted as ``non_english``."""
    fast_jpeg: bool = True
    """Decode JPEGs with libjpeg's fast integer DCT and plain chroma upsampling (~12% faster, mean
    pixel difference ~1/255); False: the accurate DCT."""
    caption_encoder: Callable[[list[str], tuple[int, ...]], torch.Tensor] | None = None
    """Tokenize each batch's captions in the data workers: ``caption_encoder(captions, key)`` returns
    the batch's ``"text"`` ids; ``key`` = (epoch, slot, examples the slot had consumed) identifies the
    batch, so seeded BPE dropout gives a resumed run the ids of the uninterrupted one (see
    :class:`dalle_ds.data.text.CaptionEncoder`). Must be picklable."""

    def __post_init__(self):
        if self.image_size < 8:
            raise ValueError(f"DataConfig.image_size={self.image_size}: must be >= 8")
        if not 0 < self.min_aspect <= 1 <= self.max_aspect:
            raise ValueError(f"DataConfig aspect range [{self.min_aspect}, {self.max_aspect}] must contain 1")
        if self.shuffle_buffer < 1:
            raise ValueError(f"DataConfig.shuffle_buffer={self.shuffle_buffer}: must be >= 1")


def _pick_columns(cfg: DataConfig, columns: list[str], where: str) -> tuple[str, str]:
    if cfg.image_column is None and CODES_COLUMN in columns:
        image_col = CODES_COLUMN  # precomputed dVAE codes
    else:
        image_col = cfg.image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    caption_col = cfg.caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
    for what, col in (("image_column", image_col), ("caption_column", caption_col)):
        if col is None or col not in columns:
            raise ValueError(f"data source {where!r}: {what}={col!r} not found; columns are {columns}")
    return image_col, caption_col
