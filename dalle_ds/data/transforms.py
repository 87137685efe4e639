"""One example, from its raw fields to what a batch holds: the caption filters, image decoding
(JPEG draft mode), mode conversion to RGB and the paper's crop, as a uint8 tensor."""

from __future__ import annotations

import io
import json
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .config import CODES_COLUMN, BadSample, DataConfig

__all__ = ["caption_problem", "crop_tensor", "is_english", "paper_crop", "process", "read_image", "to_rgb"]

WHITE = (255, 255, 255)
BOILERPLATE = re.compile(
    r"^(image|photo|picture|untitled|no description|stock photo|thumbnail|click to enlarge|"
    r"(img|dsc|dscn|pict)[_ -]?\d+(\.\w+)?|[\w-]+\.(jpe?g|png|gif|webp|bmp|tiff?))$",
    re.IGNORECASE,
)


def read_image(data: bytes, need: int, max_pixels: int, fast: bool = False) -> Image.Image:
    """Decode to RGB; JPEGs in draft mode (DCT scaling) at the smallest size >= ``need`` per side
    (``fast``: libjpeg's fast integer DCT and plain chroma upsampling)."""
    if not data:
        raise BadSample("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadSample("decompression_bomb")
            if img.format == "JPEG":
                img.draft("RGB", (need, need))
                if fast and img.decoderconfig:
                    img.decoderconfig = (img.decoderconfig[0], 1)  # Pillow's JPEG "draft" flag
            img.load()
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadSample("decompression_bomb") from None
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on broken files
        raise BadSample("corrupt_image") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha composited on white, 16/32-bit scaled, CMYK/P/L converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        return Image.fromarray(np.clip(arr / top * 255 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        return Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", img.size, WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def _crop_box(w: int, h: int, size: int, rng: random.Random | None) -> tuple[float, float, float, float]:
    side = min(w, h)
    if rng is None:
        left, top = (w - side) / 2, (h - side) / 2
        return (left, top, left + side, top + side)
    left = rng.uniform((w - side) / 4, 3 * (w - side) / 4)
    top = rng.uniform((h - side) / 4, 3 * (h - side) / 4)
    target = rng.randint(size, size * 9 // 8)
    x, y = rng.randint(0, target - size), rng.randint(0, target - size)
    scale = side / target
    return (left + x * scale, top + y * scale, left + (x + size) * scale, top + (y + size) * scale)


def paper_crop(img: Image.Image, size: int, rng: random.Random | None) -> Image.Image:
    """The paper's augmentation: a square crop near the centre (offset uniform in the middle half
    of the slack), resize to a random side in [size, 9/8 size], random ``size`` crop; no flip.
    With ``rng=None``: centre square, resized to ``size`` (evaluation).

    Done as one antialiased bilinear resize of the final crop's box in source coordinates (the
    same pixels as resizing the square and then cropping, at a third of the cost of bicubic)."""
    return img.resize((size, size), Image.BILINEAR, box=_crop_box(img.width, img.height, size, rng))


def crop_tensor(img: Image.Image, size: int, rng: random.Random | None) -> torch.Tensor:
    """:func:`paper_crop` (same random draws) as a uint8 (3, size, size) tensor, resized by torch's
    uint8 antialiased bilinear kernel (SIMD, ~3x PIL's) from the crop box rounded to whole pixels."""
    w, h = img.size
    left, top, right, bottom = _crop_box(w, h, size, rng)
    x0, y0 = min(round(left), w - 1), min(round(top), h - 1)
    x1, y1 = min(max(round(right), x0 + 1), w), min(max(round(bottom), y0 + 1), h)
    if (x0, y0, x1, y1) != (0, 0, w, h):
        img = img.crop((x0, y0, x1, y1))  # a copy of the box only, before the bytes leave PIL
    hwc = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1, y1 - y0, x1 - x0, 3)
    chw = hwc.permute(0, 3, 1, 2)  # channels-last memory, what the uint8 SIMD kernel wants
    if chw.shape[-2:] == (size, size):
        return chw[0].contiguous()
    out = torch.nn.functional.interpolate(chw, size=(size, size), mode="bilinear", antialias=True)
    return out[0]  # channels-last strides: the batch's torch.stack makes it contiguous


def caption_problem(caption: Any, min_words: int) -> str | None:
    """The filter a caption fails (empty, short, boilerplate), or None."""
    if not isinstance(caption, str) or not caption.strip():
        return "empty_caption"
    text = " ".join(caption.split())
    if BOILERPLATE.match(text):
        return "boilerplate_caption"
    if len(text.split()) < min_words:
        return "short_caption"
    return None


def is_english(caption: str) -> bool:
    """py3langid's top language is English (its model ships in the wheel; nothing is downloaded)."""
    from py3langid.langid import classify

    return classify(caption)[0] == "en"


def _caption_of(value: Any) -> Any:
    if isinstance(value, dict):  # WebDataset .json
        return value.get("caption", value.get("text"))
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample("caption_not_utf8") from None
        if value.lstrip().startswith("{"):
            try:
                return _caption_of(json.loads(value))
            except ValueError:
                return value
    return value


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            try:
                return Path(value["path"]).read_bytes()
            except OSError:
                raise BadSample("missing_image_file") from None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise BadSample("missing_image")


def process(example: dict, cfg: DataConfig, image_col: str, caption_col: str, rng: random.Random | None):
    """(uint8 (3, S, S) image or int64 codes, caption) or BadSample."""
    caption = _caption_of(example.get(caption_col))
    problem = caption_problem(caption, cfg.min_caption_words)
    if problem:
        raise BadSample(problem)
    caption = " ".join(caption.split())
    if cfg.english_only and not is_english(caption):
        raise BadSample("non_english")
    if image_col == CODES_COLUMN:
        codes = example.get(image_col)
        if not codes:
            raise BadSample("missing_codes")
        return torch.tensor(codes, dtype=torch.int64), caption
    need = -(-cfg.image_size * 9 // 8) if cfg.augment else cfg.image_size
    img = read_image(_image_bytes(example.get(image_col)), need, cfg.max_pixels, cfg.fast_jpeg)
    aspect = img.width / img.height
    if not cfg.min_aspect <= aspect <= cfg.max_aspect:
        raise BadSample("aspect_ratio")
    return crop_tensor(img, cfg.image_size, rng if cfg.augment else None), caption
