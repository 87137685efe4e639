"""Tensor helpers of the PowerSGD hook (:mod:`.powersgd`): orthogonalisation, packing tensors into
flat buffers and back, row views."""

from __future__ import annotations

import math

import torch

__all__ = ["as_rows", "orthogonalize", "pack", "scatter_back", "views"]


def orthogonalize(mats: torch.Tensor, method: str, epsilon: float) -> None:
    """Orthonormalise the columns of each (n, r) matrix of a (b, n, r) batch, in place."""
    if method == "householder":
        mats.copy_(torch.linalg.qr(mats.float()).Q.to(mats.dtype))
        return
    for i in range(mats.shape[2]):  # Gram-Schmidt, as PyTorch's hook does it
        col = mats[:, :, i : i + 1]
        col /= torch.norm(col, dim=1, keepdim=True) + epsilon
        if i + 1 < mats.shape[2]:
            rest = mats[:, :, i + 1 :]
            rest -= torch.sum(col * rest, dim=1, keepdim=True) * col


def as_rows(g: torch.Tensor) -> torch.Tensor:
    return g.reshape(g.shape[0], -1) if g.ndim >= 2 else g.reshape(-1)


def pack(tensors: list[torch.Tensor], out: torch.Tensor) -> None:
    offset = 0
    for t in tensors:
        out[offset : offset + t.numel()].copy_(t.reshape(-1))
        offset += t.numel()


def scatter_back(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def views(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Consecutive views of ``flat`` with the given shapes."""
    out, offset = [], 0
    for shape in shapes:
        out.append(flat[offset : offset + math.prod(shape)].view(shape))
        offset += math.prod(shape)
    return out
