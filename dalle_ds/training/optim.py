"""The paper's optimiser pieces: AdamW groups without decay on gains, biases and embeddings,
cosine schedules, and the optimizer DeepSpeed steps (torch AdamW, or DeepSpeed's CPU Adam when
ZeRO offloads optimizer states)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..distributed import ds_adapter
from ..distributed.ds_config import optimizer_offloaded

__all__ = ["adamw", "cosine", "lambda_lr", "param_groups"]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on gains, biases and embeddings (paper App. D)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine(step: int, total: int, start: float, end: float) -> float:
    """Cosine interpolation from ``start`` (step 0) to ``end`` (step >= total)."""
    if total <= 0 or step >= total:
        return end
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * step / total))


def lambda_lr(factor):
    """A scheduler factory: DeepSpeed builds it on the optimizer it actually steps (ZeRO regroups
    parameters, so a scheduler made on the client optimizer would hold the wrong groups)."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw(params, ds_config: dict[str, Any], lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
    """AdamW; DeepSpeed's CPU Adam when the config offloads optimizer states to CPU (unless the
    config sets ``zero_force_ds_cpu_optimizer: false``, which allows torch's AdamW there)."""
    if optimizer_offloaded(ds_config) and ds_config.get("zero_force_ds_cpu_optimizer", True):
        return ds_adapter.cpu_adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
