"""Image tensors and files: the batch's pixel format, PNG grids of reconstructions and samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .files import atomic_path

__all__ = ["as_float_image", "save_grid", "to_pil"]


def as_float_image(images: torch.Tensor) -> torch.Tensor:
    """Pixels as the models take them: float in [0, 1].

    Streams deliver uint8 (a quarter of the bytes through workers and host-to-device copies; convert
    after moving to the device); the synthetic set and files read for evaluation deliver float.
    Float input is returned as is (no copy).
    """
    if images.dtype == torch.uint8:
        return images.float().div_(255)
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating point, got {images.dtype}")
    return images


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> RGB image."""
    arr = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int = 8, pad: int = 2) -> Path:
    """Save (B, 3, H, W) images in [0, 1] as one PNG grid (written atomically)."""
    path = Path(path)
    b, _, h, w = images.shape
    ncol = max(1, min(nrow, b))
    nrows = (b + ncol - 1) // ncol
    grid = Image.new("RGB", (ncol * (w + pad) + pad, nrows * (h + pad) + pad), (128, 128, 128))
    for i in range(b):
        r, c = divmod(i, ncol)
        grid.paste(to_pil(images[i]), (pad + c * (w + pad), pad + r * (h + pad)))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path
