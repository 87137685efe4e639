"""DALL-E sparse attention: a dense reference and a block-sparse implementation.

Both compute the same function (see :mod:`dalle_ds.masks` for the masks):

* ``dense``: one SDPA call with the full boolean ``n x n`` mask. Simple and
  obviously right; costs ``n**2`` scores.
* ``block``: the paper's block idea. Text queries run causal attention over text.
  Image queries are cut into blocks of ``R`` image rows; a block attends all text
  keys plus only the image rows it can see: the previous row and its own for
  ``row`` layers, the ``k // 2`` rows above and its own for ``conv``, and for
  ``column`` layers the image is transposed first, so a column becomes a row and
  a block needs only its own rows. All blocks go through one batched SDPA call
  with a small per-block mask; no tensor of ``n x n`` (or image x image) scores
  is ever formed.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .masks import ATTENTION_KINDS, allowed, attention_mask

__all__ = ["ATTENTION_IMPLS", "SparseAttention", "block_attention", "dense_attention", "sparse_attention"]

ATTENTION_IMPLS = ("block", "dense")

_MASK_CACHE: dict[tuple, torch.Tensor] = {}


def _cached(key: tuple, build) -> torch.Tensor:
    mask = _MASK_CACHE.get(key)
    if mask is None:
        if len(_MASK_CACHE) > 64:
            _MASK_CACHE.clear()
        mask = _MASK_CACHE[key] = build()
    return mask


def dense_attention(q, k, v, kind: str, text_len: int, grid_size: int, conv_kernel: int = 11):
    """Reference: SDPA with the full boolean mask. q, k, v: (B, H, n, d), n <= text_len + grid**2."""
    n = q.shape[-2]
    key = ("dense", kind, text_len, grid_size, conv_kernel, q.device)
    mask = _cached(key, lambda: attention_mask(kind, text_len, grid_size, conv_kernel, q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:n, :n])


def _block_rows(grid_size: int, block_rows: int) -> int:
    """Largest divisor of grid_size that is <= block_rows."""
    return max(r for r in range(1, min(block_rows, grid_size) + 1) if grid_size % r == 0)


def _lookback_rows(kind: str, conv_kernel: int) -> int:
    """Image rows above a block that its queries can see (in the possibly transposed grid)."""
    return {"row": 1, "column": 0, "conv": conv_kernel // 2}[kind]


def _block_mask(
    kind: str, text_len: int, grid_size: int, conv_kernel: int, rows: int, heads: int, device
) -> torch.Tensor:
    """Bool (1, heads * n_blocks, rows * W, text_len + (rows + look) * W) mask of the block layout."""
    w, look = grid_size, _lookback_rows(kind, conv_kernel)
    n_blocks = grid_size // rows
    b = torch.arange(n_blocks, device=device)[:, None, None, None, None]
    qi = torch.arange(rows, device=device)[None, :, None, None, None]  # query row in block
    qc = torch.arange(w, device=device)[None, None, :, None, None]
    kj = torch.arange(rows + look, device=device)[None, None, None, :, None]  # key row in window
    kc = torch.arange(w, device=device)[None, None, None, None, :]
    rq, rk = b * rows + qi, b * rows - look + kj  # rows in the (transposed) grid
    if kind == "column":  # blocks run over the transposed grid: swap back to image coordinates
        img = allowed(kind, qc, rq, kc, rk, w, conv_kernel) & (rk >= 0)
    else:
        img = allowed(kind, rq, qc, rk, kc, w, conv_kernel)
    img = img.reshape(n_blocks, rows * w, (rows + look) * w)
    text = torch.ones(n_blocks, rows * w, text_len, dtype=torch.bool, device=device)
    mask = torch.cat([text, img], dim=-1)  # (n_blocks, R*W, S)
    return mask.unsqueeze(0).expand(heads, -1, -1, -1).reshape(1, heads * n_blocks, *mask.shape[1:])


def block_attention(q, k, v, kind: str, text_len: int, grid_size: int, conv_kernel: int = 11, block_rows: int = 2):
    """Block-sparse DALL-E attention. q, k, v: (B, H, n, d) with n = text_len + grid**2."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {ATTENTION_KINDS}")
    B, H, n, d = q.shape
    T, W = text_len, grid_size
    N = W * W
    if n != T + N:
        raise ValueError(f"block attention needs the full sequence: n={n}, text_len + grid**2 = {T + N}")
    R = _block_rows(W, block_rows)
    look = _lookback_rows(kind, conv_kernel)
    nb = W // R

    qt, qi = q.split([T, N], dim=2)
    kt, ki = k.split([T, N], dim=2)
    vt, vi = v.split([T, N], dim=2)

    def to_grid(x):  # (B, H, N, d) -> (B, H, W, W, d), rows of the (transposed) grid on dim 2
        x = x.reshape(B, H, W, W, d)
        return x.transpose(2, 3) if kind == "column" else x

    def windows(x):  # (B, H, W, W, d) -> (B, H, nb, (R + look) * W, d): rows each block can see
        if look:
            x = F.pad(x, (0, 0, 0, 0, look, 0))
        x = x.unfold(2, R + look, R)  # (B, H, nb, W, d, R + look)
        return x.permute(0, 1, 2, 5, 3, 4).reshape(B, H, nb, (R + look) * W, d)

    def with_text(x_img, x_text):  # every block also sees all text keys
        return torch.cat([x_text.unsqueeze(2).expand(B, H, nb, T, d), x_img], dim=3)

    qb = to_grid(qi).reshape(B, H * nb, R * W, d)  # (B, H*nb, R*W, d)
    kb = with_text(windows(to_grid(ki)), kt).reshape(B, H * nb, -1, d)
    vb = with_text(windows(to_grid(vi)), vt).reshape(B, H * nb, -1, d)
    mask = _cached(
        ("block", kind, T, W, conv_kernel, R, H, q.device),
        lambda: _block_mask(kind, T, W, conv_kernel, R, H, q.device),
    )
    ob = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask)  # (B, H*nb, R*W, d)
    oi = ob.reshape(B, H, W, W, d)
    if kind == "column":
        oi = oi.transpose(2, 3)
    oi = oi.reshape(B, H, N, d)
    if T == 0:
        return oi
    ot = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    return torch.cat([ot, oi], dim=2)


def sparse_attention(
    q, k, v, kind: str, text_len: int, grid_size: int, conv_kernel: int = 11, impl: str = "block", block_rows: int = 2
):
    """Dispatch to an implementation; 'block' falls back to 'dense' for partial sequences."""
    if impl == "block" and q.shape[-2] == text_len + grid_size**2:
        return block_attention(q, k, v, kind, text_len, grid_size, conv_kernel, block_rows)
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl={impl!r}: must be one of {ATTENTION_IMPLS}")
    return dense_attention(q, k, v, kind, text_len, grid_size, conv_kernel)


class SparseAttention(nn.Module):
    """Multi-head self-attention with one of the DALL-E masks (row, column or conv)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        kind: str,
        text_len: int,
        grid_size: int,
        conv_kernel: int = 11,
        impl: str = "block",
        block_rows: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"kind={kind!r}: must be one of {ATTENTION_KINDS}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"impl={impl!r}: must be one of {ATTENTION_IMPLS}")
        self.n_heads, self.kind, self.impl = n_heads, kind, impl
        self.text_len, self.grid_size = text_len, grid_size
        self.conv_kernel, self.block_rows = conv_kernel, block_rows
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, n, D = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = sparse_attention(
            q, k, v, self.kind, self.text_len, self.grid_size, self.conv_kernel, self.impl, self.block_rows
        )  # (B, H, n, hd)
        return self.dropout(self.proj(y.transpose(1, 2).reshape(B, n, D)))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, impl={self.impl!r}, heads={self.n_heads}"
