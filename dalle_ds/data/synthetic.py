"""A synthetic captioned-shapes set: learnable, checkable, made on the fly (deterministic by seed).

Each image is one coloured shape (4 colours x 3 shapes x 9 positions = 108 combinations) on a
white background, captioned like "a red circle at the top left". The generator knows every
attribute, and :func:`read_attributes` reads them back from an image (used to score generated
samples), so the whole text-to-image pipeline can be measured end to end on a laptop.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..utils.images import as_float_image
from ..utils.seeding import derive_seed

__all__ = [
    "ALL_COMBOS",
    "COLOURS",
    "POSITIONS",
    "SHAPES",
    "Combo",
    "SyntheticShapes",
    "caption_of",
    "holdout_combos",
    "read_attributes",
    "render",
    "write_tar",
    "write_webdataset",
]

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {  # name -> (row, col) in a 3 x 3 layout
    "top left": (0, 0),
    "top": (0, 1),
    "top right": (0, 2),
    "left": (1, 0),
    "center": (1, 1),
    "right": (1, 2),
    "bottom left": (2, 0),
    "bottom": (2, 1),
    "bottom right": (2, 2),
}
BACKGROUND = (255, 255, 255)
_ITEMS = 6  # derive_seed domain of item i's combination and drawing (0-5: the trainer's and the stream's)


@dataclass(frozen=True)
class Combo:
    colour: str
    shape: str
    position: str


ALL_COMBOS = tuple(Combo(c, s, p) for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS))


def holdout_combos(n: int) -> list[Combo]:
    """The ``n`` combinations held out of training for zero-shot evaluation (fixed, seed 1234)."""
    return random.Random(1234).sample(ALL_COMBOS, n) if n else []


def caption_of(combo: Combo) -> str:
    where = "in the center" if combo.position == "center" else f"at the {combo.position}"
    return f"a {combo.colour} {combo.shape} {where}"


def render(combo: Combo, image_size: int, rng: random.Random | None = None) -> Image.Image:
    """Draw ``combo``; ``rng`` adds a small deterministic jitter of position and size."""
    rng = rng or random.Random(0)
    cell = image_size / 3
    row, col = POSITIONS[combo.position]
    # Large shapes (84-94% of a cell across), small jitter: a tiny dVAE rounds the corners of smaller
    # ones (measured at 32 px, 8 x 8 codes, 600 steps: 55% of reconstructions kept their shape with
    # 72-84% of a cell, 78% with these sizes).
    half = cell * (0.42 + 0.05 * rng.random())
    cx = (col + 0.5) * cell + rng.uniform(-0.05, 0.05) * cell
    cy = (row + 0.5) * cell + rng.uniform(-0.05, 0.05) * cell
    img = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    box = (cx - half, cy - half, cx + half, cy + half)
    fill = COLOURS[combo.colour]
    if combo.shape == "circle":
        draw.ellipse(box, fill=fill)
    elif combo.shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=fill)
    return img


def read_attributes(image) -> Combo | None:
    """Colour, shape and position read back from an image (PIL, uint8 HWC array or float CHW tensor).

    Foreground = pixels far from the white background; colour = nearest palette entry to their
    mean; position = the 3 x 3 cell of their centroid; shape = how much of its bounding box the
    shape fills (square ~1, circle ~0.79, triangle ~0.5). None when no shape is visible.
    """
    if isinstance(image, torch.Tensor):
        arr = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255
    else:
        arr = np.asarray(image, dtype=np.float32)
    size = arr.shape[0]
    fg = np.abs(arr - np.array(BACKGROUND, dtype=np.float32)).sum(-1) > 150
    if fg.sum() < max(4, size * size // 400):
        return None
    mean = arr[fg].mean(0)
    colour = min(COLOURS, key=lambda c: float(((np.array(COLOURS[c]) - mean) ** 2).sum()))
    ys, xs = np.nonzero(fg)
    row, col = min(2, int(ys.mean() / size * 3)), min(2, int(xs.mean() / size * 3))
    position = next(p for p, rc in POSITIONS.items() if rc == (row, col))
    fill = fg.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    shape = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"
    return Combo(colour, shape, position)


class SyntheticShapes(torch.utils.data.Dataset):
    """Map-style dataset of (image, caption) pairs; item i is the same for a given seed.

    ``exclude`` removes combinations (e.g. to hold them out for zero-shot evaluation).
    Items: ``{"image": float (3, S, S) in [0, 1], "caption": str, "combo": Combo}``.
    """

    def __init__(self, size: int, image_size: int = 32, seed: int = 0, exclude=()):
        excluded = set(exclude)
        self.combos = [c for c in ALL_COMBOS if c not in excluded]
        if not self.combos:
            raise ValueError("exclude removes every combination")
        self.size, self.image_size, self.seed = size, image_size, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = random.Random(derive_seed(self.seed, _ITEMS, index))
        combo = self.combos[rng.randrange(len(self.combos))]
        img = render(combo, self.image_size, rng)
        image = as_float_image(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
        return {"image": image, "caption": caption_of(combo), "combo": combo}


def write_tar(path, samples) -> None:
    """One WebDataset shard: ``samples`` are (key, {extension: bytes}); members ``{key}.{extension}``
    with fixed mtime and mode, so the same samples give the same bytes."""
    import io
    import tarfile

    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, files in samples:
            for ext, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(payload), 0, 0o644
                tar.addfile(info, io.BytesIO(payload))


def write_webdataset(
    out_dir, size: int, shards: int = 4, image_size: int = 64, seed: int = 0, exclude=(), fmt: str = "png"
) -> list:
    """Write ``SyntheticShapes(size, image_size, seed, exclude)`` as WebDataset tar shards
    (``{key}.{fmt}`` image, ``{key}.txt`` caption, ``{key}.json`` attributes), item i into shard
    i % shards; deterministic by seed, byte for byte. Returns the shard paths."""
    import io
    import json
    from pathlib import Path

    if fmt not in ("png", "jpg"):
        raise ValueError(f"fmt={fmt!r}: png or jpg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = SyntheticShapes(size, image_size, seed, exclude)

    def sample(i: int):
        item = data[i]
        img = Image.fromarray((item["image"] * 255).round().byte().permute(1, 2, 0).numpy())
        buf = io.BytesIO()
        img.save(buf, "PNG" if fmt == "png" else "JPEG", quality=95)
        combo = item["combo"]
        meta = {"colour": combo.colour, "shape": combo.shape, "position": combo.position, "index": i}
        return f"{i:08d}", {
            fmt: buf.getvalue(),
            "txt": item["caption"].encode(),
            "json": json.dumps(meta, sort_keys=True).encode(),
        }

    paths = [out / f"shapes-{i:05d}.tar" for i in range(shards)]
    for shard, path in enumerate(paths):
        write_tar(path, (sample(i) for i in range(shard, size, shards)))
    return paths
