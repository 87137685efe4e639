"""Moving host batches to the engine's device: pinned first on CUDA, so the copies are asynchronous."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["batch_to_device", "pins_batches", "to_device"]


def pins_batches(device: torch.device | str) -> bool:
    """Whether host batches are pinned before the copy to ``device``: on CUDA a pinned source lets
    the ``non_blocking`` copy run asynchronously; on the CPU there is no copy to overlap."""
    return torch.device(device).type == "cuda"


def batch_to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, Any]:
    """``batch`` with its tensors on ``device`` (captions stay lists), copied without blocking the host,
    from pinned memory when :func:`pins_batches` says so."""
    return {k: to_device(v, device) if torch.is_tensor(v) else v for k, v in batch.items()}


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device`` without blocking the host: a host tensor bound for CUDA is pinned first
    (PyTorch keeps the pinned copy alive until the transfer is done); one already there is returned."""
    if pins_batches(device) and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)
