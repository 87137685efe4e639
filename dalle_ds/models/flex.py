"""DALL-E attention through PyTorch's FlexAttention (``attention_impl: flex``).

FlexAttention (:mod:`torch.nn.attention.flex_attention`) computes attention one (query block, key
block) tile at a time, never stores a score matrix, and skips the tiles a ``BlockMask`` marks empty.
The BlockMask comes from the project's own rule, :func:`dalle_ds.models.masks.allowed`, and is built
once per (kind, text_len, grid, conv_kernel, device, block size); the kernel is ``torch.compile``d
once and reused (each new mask or shape compiles once more).

``column`` layers put the image in column-major order first (the text keeps its place), so a column
becomes ``grid`` consecutive positions and its keys sit in dense tiles near the diagonal: q, k and v
are permuted in, the output is permuted back, and the mask is written in that order. At text 256 +
32x32 in blocks of 128 that skips 73% of the tiles instead of 45% in raster order.

FlexAttention has no backward on the CPU in torch 2.13: there it runs under ``torch.no_grad()`` (or
on inputs that need no gradient), and asking it for gradients raises :func:`check_backward`'s error.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask
from torch.nn.attention.flex_attention import flex_attention as torch_flex_attention

from .masks import ATTENTION_KINDS, allowed

__all__ = ["COMPILE", "FLEX_BLOCK_SIZE", "check_backward", "flex_attention", "flex_block_mask", "layer_order"]

FLEX_BLOCK_SIZE = 128
"""Query and key block size of the BlockMask (FlexAttention's default)."""

COMPILE = True
"""Run FlexAttention compiled (its fused kernel). False runs PyTorch's eager version, which forms the
whole score matrix: a reference for tests and debugging, not for speed."""


def check_backward(device_type: str) -> None:
    """Raise a clear error where FlexAttention cannot run backward (the CPU, torch 2.13)."""
    if device_type == "cpu":
        raise RuntimeError(
            "attention_impl=flex: FlexAttention has no CPU backward in torch 2.13; "
            "use block or dense for training on CPU (flex runs on CPU under torch.no_grad())"
        )


def layer_order(kind: str, text_len: int, grid_size: int, device=None) -> torch.Tensor | None:
    """Raster position of each position in the order the layer runs in: the text, then the image
    column-major for ``column`` layers; None for the others (raster order)."""
    return _column_order(text_len, grid_size, torch.device(device or "cpu"))[0] if kind == "column" else None


@functools.lru_cache(maxsize=64)
def _column_order(text_len: int, grid_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.arange(grid_size * grid_size, device=device).view(grid_size, grid_size).t().flatten()
    order = torch.cat([torch.arange(text_len, device=device), text_len + image])
    return order, torch.argsort(order)


def _mask_mod(kind: str, text_len: int, grid_size: int, conv_kernel: int):
    """The layer's mask as FlexAttention's ``mask_mod``, on positions in :func:`layer_order`."""
    T, W = text_len, grid_size

    def grid_coords(i):
        p = i - T  # image index in the layer's order (negative on text)
        return (p % W, p // W) if kind == "column" else (p // W, p % W)

    def mask_mod(b, h, q_idx, kv_idx):
        rq, cq = grid_coords(q_idx)
        rk, ck = grid_coords(kv_idx)
        image = allowed(kind, rq, cq, rk, ck, W, conv_kernel)
        # Text queries: causal over text. Image queries: every text key, plus the image keys allowed.
        return torch.where(q_idx < T, kv_idx <= q_idx, (kv_idx < T) | image)

    return mask_mod


_BLOCK_MASKS: dict[tuple, BlockMask] = {}


def flex_block_mask(
    kind: str, text_len: int, grid_size: int, conv_kernel: int = 11, device=None, block_size: int = FLEX_BLOCK_SIZE
) -> BlockMask:
    """The layer's BlockMask over text_len + grid**2 positions in :func:`layer_order` (cached)."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {ATTENTION_KINDS}")
    device = torch.device(device or "cpu")
    key = (kind, text_len, grid_size, conv_kernel, device, block_size)
    mask = _BLOCK_MASKS.get(key)
    if mask is None:
        if len(_BLOCK_MASKS) > 64:
            _BLOCK_MASKS.clear()
        n = text_len + grid_size**2
        mod = _mask_mod(kind, text_len, grid_size, conv_kernel)
        mask = _BLOCK_MASKS[key] = create_block_mask(mod, None, None, n, n, device=device, BLOCK_SIZE=block_size)
    return mask


@functools.cache
def _compiled():
    return torch.compile(torch_flex_attention)


def _kernel(q, k, v, block_mask: BlockMask, compile: bool):
    """The FlexAttention call itself (the dry run's activation trace stands in for it)."""
    return (_compiled() if compile else torch_flex_attention)(q, k, v, block_mask=block_mask)


def flex_attention(
    q,
    k,
    v,
    kind: str,
    text_len: int,
    grid_size: int,
    conv_kernel: int = 11,
    block_size: int = FLEX_BLOCK_SIZE,
    compile: bool | None = None,
):
    """DALL-E attention through FlexAttention. q, k, v: (B, H, n, d), n = text_len + grid**2, raster
    order. ``compile``: run the compiled kernel (None: :data:`COMPILE`)."""
    n, full = q.shape[2], text_len + grid_size**2
    if n != full:
        raise ValueError(f"flex attention needs the full sequence: n={n}, text_len + grid**2 = {full}")
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        check_backward(q.device.type)
    mask = flex_block_mask(kind, text_len, grid_size, conv_kernel, q.device, block_size)
    compile = COMPILE if compile is None else compile
    if kind != "column":
        return _kernel(q, k, v, mask, compile)
    order, inverse = _column_order(text_len, grid_size, q.device)
    out = _kernel(q.index_select(2, order), k.index_select(2, order), v.index_select(2, order), mask, compile)
    return out.index_select(2, inverse)
