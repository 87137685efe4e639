"""Image grids as PNG (PIL): reconstructions and samples during training."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB image."""
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, pad: int = 2) -> Path:
    """Save (B, 3, H, W) images in [0, 1] as one PNG grid (written atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    b, _, h, w = images.shape
    ncol = max(1, min(nrow, b))
    nrows = (b + ncol - 1) // ncol
    grid = Image.new("RGB", (ncol * (w + pad) + pad, nrows * (h + pad) + pad), (128, 128, 128))
    for i in range(b):
        r, c = divmod(i, ncol)
        grid.paste(to_pil(images[i]), (pad + c * (w + pad), pad + r * (h + pad)))
    tmp = path.with_name(f".{path.name}.tmp")
    grid.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
