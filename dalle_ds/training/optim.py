"""The paper's optimiser pieces: AdamW groups without decay on gains, biases and embeddings,
cosine schedules, and the optimizer DeepSpeed steps (torch AdamW, fused on CUDA, or DeepSpeed's CPU
Adam when ZeRO offloads optimizer states)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..distributed import ds_adapter
from ..distributed.ds_config import optimizer_offloaded
from .run_config import RunConfig

__all__ = ["adamw", "adamw_and_schedule", "cosine", "fused_adamw", "lambda_lr", "lr_factor", "param_groups"]


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


def lr_factor(step: int, total: int, warmup: int, end: float) -> float:
    """The learning rate at ``step`` as a fraction of the peak: linear warm-up over ``warmup`` steps
    (none when 0), then cosine decay to ``end`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return cosine(step - warmup, total - warmup, 1.0, end)


def lambda_lr(factor):
    """A scheduler factory: DeepSpeed builds it on the optimizer it actually steps (ZeRO regroups
    parameters, so a scheduler made on the client optimizer would hold the wrong groups)."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fused_adamw(device_type: str, offloaded: bool) -> bool:
    """Whether torch's AdamW should run its fused kernel (a few launches for all the tensors instead of
    several per tensor): when the parameters live on CUDA, the engine's device (``device_type``), which
    torch (>= 2.0, setup.py pins 2.13) supports. Optimizer states offloaded to the CPU, and every other
    device, get the plain (foreach) AdamW."""
    return device_type == "cuda" and not offloaded


def adamw(params, ds_config: dict[str, Any], lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
    """AdamW; DeepSpeed's CPU Adam when the config offloads optimizer states to CPU (unless the
    config sets ``zero_force_ds_cpu_optimizer: false``, which allows torch's AdamW there); torch's
    fused AdamW when DeepSpeed's accelerator is CUDA and the states stay there (:func:`fused_adamw`)."""
    offloaded = optimizer_offloaded(ds_config)
    if offloaded and ds_config.get("zero_force_ds_cpu_optimizer", True):
        return ds_adapter.cpu_adam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    fused = fused_adamw(ds_adapter.accelerator()[0], offloaded)
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=fused or None)


def adamw_and_schedule(params, cfg: RunConfig, ds_config: dict[str, Any]):
    """AdamW with the run's ``optimizer`` settings and its LambdaLR factory: linear warm-up
    (``schedule.warmup_steps``, default 1/20 of the run), then cosine decay to ``schedule.lr_end``
    (default 10% of the peak)."""
    opt, sched, steps = cfg.optimizer, cfg.schedule, cfg.train.steps
    optimizer = adamw(params, ds_config, lr=opt.lr, betas=opt.betas, eps=opt.eps, weight_decay=opt.weight_decay)
    warmup = sched.warmup_steps if sched.warmup_steps is not None else max(1, steps // 20)
    end = 0.1 if sched.lr_end is None else sched.lr_end / opt.lr
    return optimizer, lambda_lr(lambda s: lr_factor(s, steps, warmup, end))
