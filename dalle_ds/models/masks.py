"""DALL-E attention masks (paper App. B.1, Fig. 11) as dense boolean references.

The sequence is ``text_len`` text positions followed by ``grid_size**2`` image
positions in raster order. ``mask[i, j]`` is True where query position ``i`` may
attend key position ``j``. Every mask is causal. Text queries attend causally
over text. Every image query attends all text positions plus the image keys its
kind allows; for image raster indices ``p`` (query) and ``q <= p`` (key) on a grid
of width ``W``:

* ``row``: ``p - q <= W``. Self plus the previous ``W`` tokens in raster order, so the
  window wraps into the previous row and ends at the same column one row up.
* ``column``: ``q = p (mod W)``. Same column, earlier rows, plus self.
* ``conv``: the causal half of a ``k x k`` neighbourhood, not wrapped: with
  ``h = k // 2``, keys ``(r', c')`` with ``r - h <= r' <= r`` and ``|c' - c| <= h``
  (clipped at the grid's left and right edges), and on the query's own row only
  ``c' <= c``. It is used in the last layer only.

These functions build ``n x n`` tensors: they are the reference and the drawing
source, not the training path (see :mod:`dalle_ds.models.attention`).
"""

from __future__ import annotations

import torch

__all__ = ["ATTENTION_KINDS", "allowed", "attention_mask", "image_mask", "layer_schedule"]

ATTENTION_KINDS = ("row", "column", "conv")


def layer_schedule(n_layers: int) -> list[str]:
    """Attention kind of each layer, the paper's rule.

    For layers ``i = 1..n_layers`` (1-based): the last layer is ``conv``; otherwise
    ``column`` if ``(i - 2) % 4 == 0`` else ``row``. The first four layers are
    row, column, row, row.
    """
    if n_layers < 1:
        raise ValueError(f"n_layers={n_layers}: must be >= 1")
    kinds = ["column" if (i - 2) % 4 == 0 else "row" for i in range(1, n_layers)]
    return kinds + ["conv"]


def allowed(kind: str, rq, cq, rk, ck, grid_size: int, conv_kernel: int = 11) -> torch.Tensor:
    """Elementwise rule: may the image query at (row rq, col cq) attend the key at (rk, ck)?

    Arguments are broadcastable integer tensors of grid coordinates. This is the one
    definition of the image part of every mask; the dense reference and the block
    implementation both call it.
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {ATTENTION_KINDS}")
    w = grid_size
    p = rq * w + cq  # query raster index
    q = rk * w + ck  # key raster index
    causal = (q <= p) & (rk >= 0)
    if kind == "row":
        return causal & (p - q <= w)
    if kind == "column":
        return causal & (cq == ck)
    if conv_kernel < 1 or conv_kernel % 2 == 0:
        raise ValueError(f"conv_kernel={conv_kernel}: must be a positive odd integer")
    h = conv_kernel // 2
    return causal & (rq - rk <= h) & ((ck - cq).abs() <= h)


def image_mask(kind: str, grid_size: int, conv_kernel: int = 11, device=None) -> torch.Tensor:
    """Image-to-image part of the mask: bool [N, N], N = grid_size**2, raster order."""
    idx = torch.arange(grid_size * grid_size, device=device)
    r, c = idx // grid_size, idx % grid_size
    return allowed(kind, r[:, None], c[:, None], r[None, :], c[None, :], grid_size, conv_kernel)


def attention_mask(kind: str, text_len: int, grid_size: int, conv_kernel: int = 11, device=None) -> torch.Tensor:
    """Full DALL-E mask: bool [n, n], n = text_len + grid_size**2; True = may attend."""
    if text_len < 0 or grid_size < 1:
        raise ValueError(f"text_len={text_len}, grid_size={grid_size}: need text_len >= 0, grid_size >= 1")
    n_img = grid_size * grid_size
    n = text_len + n_img
    mask = torch.zeros(n, n, dtype=torch.bool, device=device)
    mask[:text_len, :text_len] = torch.ones(text_len, text_len, dtype=torch.bool, device=device).tril()
    mask[text_len:, :text_len] = True
    mask[text_len:, text_len:] = image_mask(kind, grid_size, conv_kernel, device=device)
    return mask
