"""Key/value caches for sampling: one per attention layer, filled by a prefill, then one position a step.

* :class:`KVCache` keeps every position and masks each new query with its row of the layer's full
  mask (:func:`dalle_ds.models.masks.attention_mask`): the reference.
* :class:`BoundedKVCache` keeps the text keys plus only the image keys a later query of its
  layer's kind can still see (see :mod:`dalle_ds.models.masks`): ``row`` the last ``W + 1``
  positions (a ring), ``conv`` the last ``(k // 2 + 1) * W`` (a ring, masked to the ``k x k``
  half window), ``column`` every position (stored column-major, so a query reads one contiguous
  column). A step attends only those keys, not the whole prefix.

Both are driven by :meth:`SparseAttention.forward`: ``prefill(k, v, attn)`` with the keys of the
first positions (whose attention the layer computes itself), then ``step(q, k, v, attn)`` per new
position, which stores its key and value and returns its attention output. ``attn`` is the layer
(its kind, text_len, grid_size, conv_kernel). ``expand(n)`` repeats every batch entry ``n`` times
(candidates sharing one prefill). Position-dependent choices use Python ints only: no step reads
a tensor value back to the host.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import allowed, attention_mask

__all__ = ["BoundedKVCache", "KVCache"]

_MASKS: dict[tuple, torch.Tensor] = {}


def _memo(key: tuple, build) -> torch.Tensor:
    if key not in _MASKS:
        if len(_MASKS) > 32:
            _MASKS.clear()
        _MASKS[key] = build()
    return _MASKS[key]


class KVCache:
    """Keys and values of every position so far, for one attention layer (preallocated for the sequence)."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store (B, H, m, hd) keys / values; returns views of everything stored so far."""
        m = k.shape[2]
        if self.k is None:
            self.k = k.new_empty(*k.shape[:2], capacity, k.shape[3])
            self.v = v.new_empty(*v.shape[:2], capacity, v.shape[3])
        if self.length + m > self.k.shape[2]:
            raise ValueError(f"KVCache: {self.length} + {m} positions exceed the sequence length {self.k.shape[2]}")
        self.k[:, :, self.length : self.length + m] = k
        self.v[:, :, self.length : self.length + m] = v
        self.length += m
        return self.k[:, :, : self.length], self.v[:, :, : self.length]

    def prefill(self, k: torch.Tensor, v: torch.Tensor, attn) -> None:
        self.append(k, v, attn.text_len + attn.grid_size**2)

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn) -> torch.Tensor:
        """New queries (B, H, n, hd) against every cached key they may see: one mask row each."""
        start, n = self.length, q.shape[2]
        k, v = self.append(k, v, attn.text_len + attn.grid_size**2)
        key = ("full", attn.kind, attn.text_len, attn.grid_size, attn.conv_kernel, q.device)
        mask = _memo(key, lambda: attention_mask(attn.kind, attn.text_len, attn.grid_size, attn.conv_kernel, q.device))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[start : start + n, : start + n])

    def expand(self, n: int) -> None:
        self.k, self.v = self.k.repeat_interleave(n, 0), self.v.repeat_interleave(n, 0)


def _conv_ring_mask(grid: int, conv_kernel: int, slots: int, device) -> torch.Tensor:
    """bool (N, slots): may image query p see the key in ring slot s (holding position p - (p - s) % slots)?"""
    p = torch.arange(grid * grid, device=device)[:, None]
    pos = p - (p - torch.arange(slots, device=device)[None, :]) % slots
    ok = allowed("conv", p // grid, p % grid, pos.clamp(min=0) // grid, pos.clamp(min=0) % grid, grid, conv_kernel)
    return ok & (pos >= 0)


class BoundedKVCache:
    """Text keys plus the image keys a later query of this layer's kind may see (module docstring)."""

    def __init__(self):
        self.length = 0
        self.text_k = self.text_v = self.img_k = self.img_v = None

    def _slot(self, p: int, attn) -> int:
        W = attn.grid_size
        if attn.kind == "column":
            return (p % W) * W + p // W
        return p % self.slots

    def prefill(self, k: torch.Tensor, v: torch.Tensor, attn) -> None:
        T, W = attn.text_len, attn.grid_size
        B, H, n, hd = k.shape
        if n < T:
            raise ValueError(f"BoundedKVCache: the prefill must hold all {T} text positions, got {n}")
        slots = {"row": W + 1, "conv": (attn.conv_kernel // 2 + 1) * W, "column": W * W}[attn.kind]
        self.slots = min(slots, W * W)
        self.text_k, self.text_v = k[:, :, :T].clone(), v[:, :, :T].clone()
        self.img_k, self.img_v = k.new_zeros(B, H, self.slots, hd), v.new_zeros(B, H, self.slots, hd)
        first = max(0, n - T - self.slots)  # earlier positions would be overwritten in a ring
        if n - T > first:
            idx = torch.tensor([self._slot(p, attn) for p in range(first, n - T)], device=k.device)
            self.img_k.index_copy_(2, idx, k[:, :, T + first :])
            self.img_v.index_copy_(2, idx, v[:, :, T + first :])
        self.length = n

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn) -> torch.Tensor:
        """One new image position: store it, attend text + its window. q, k, v: (B, H, 1, hd)."""
        T, W = attn.text_len, attn.grid_size
        if q.shape[2] != 1:
            raise ValueError(f"BoundedKVCache steps one position at a time, got {q.shape[2]}")
        p = self.length - T
        if not 0 <= p < W * W:
            raise ValueError(f"BoundedKVCache: position {self.length} is not an image position")
        s = self._slot(p, attn)
        self.img_k[:, :, s : s + 1] = k
        self.img_v[:, :, s : s + 1] = v
        self.length += 1
        mask = None
        if attn.kind == "column":  # column-major: the query's column, rows 0 .. its own
            lo, hi = (p % W) * W, (p % W) * W + p // W + 1
        else:
            lo, hi = 0, min(p + 1, self.slots)
            if attn.kind == "conv":
                key = ("ring", W, attn.conv_kernel, self.slots, q.device)
                mask = _memo(key, lambda: _conv_ring_mask(W, attn.conv_kernel, self.slots, q.device))[p, lo:hi]
        ki, vi = self.img_k[:, :, lo:hi], self.img_v[:, :, lo:hi]
        scale = q.shape[-1] ** -0.5
        scores = torch.cat([q @ self.text_k.transpose(-1, -2), q @ ki.transpose(-1, -2)], dim=-1).float() * scale
        if mask is not None:
            scores[..., T:].masked_fill_(~mask, float("-inf"))
        w = scores.softmax(-1).to(q.dtype)
        return w[..., :T] @ self.text_v + w[..., T:] @ vi

    def expand(self, n: int) -> None:
        for name in ("text_k", "text_v", "img_k", "img_v"):
            setattr(self, name, getattr(self, name).repeat_interleave(n, 0))
