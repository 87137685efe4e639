"""Installing per-resblock scaling on a DALL-E model, and skipping an optimizer step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .config import ResblockScalingConfig
from .scaler import GradScalingError, ResblockGradScaler

__all__ = ["SkippedStep", "install_resblock_scaling", "skipping_step"]


# --- installation on DALL-E -----------------------------------------------------------------------


def install_resblock_scaling(
    model: nn.Module, config: ResblockScalingConfig, world_size: int = 1
) -> ResblockGradScaler:
    """Per-resblock scaling on a DALL-E model: each of ``model.blocks`` (``x + attn(ln_1(x))``, then
    ``x + mlp(ln_2(x))``) runs under autocast and gets two branches, ``blocks.{i}.attn`` and
    ``blocks.{i}.mlp``; every other trainable parameter (embeddings, ``ln_f``, unembeddings) is the
    unscaled segment ``rest``. Call before activation checkpointing and before ``deepspeed.initialize``;
    parameters must be fp32."""
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0:
        raise GradScalingError(f"{type(model).__name__} has no .blocks to scale")
    scaler = ResblockGradScaler(config, world_size)
    for i, block in enumerate(blocks):
        missing = [n for n in ("ln_1", "attn", "ln_2", "mlp") if not hasattr(block, n)]
        if missing:
            raise GradScalingError(f"blocks[{i}] ({type(block).__name__}) lacks {missing}")
        scaler.autocast_forward(block)
        scaler.add_branch(
            f"blocks.{i}.attn", block.ln_1, block.attn, [*block.ln_1.parameters(), *block.attn.parameters()]
        )
        scaler.add_branch(f"blocks.{i}.mlp", block.ln_2, block.mlp, [*block.ln_2.parameters(), *block.mlp.parameters()])
        if any(p.requires_grad and id(p) not in scaler._param_ids for p in block.parameters()):
            raise GradScalingError(f"blocks[{i}] has trainable parameters outside ln_1/attn/ln_2/mlp")
    scaler.add_unscaled("rest", [p for p in model.parameters() if id(p) not in scaler._param_ids])
    return scaler


# --- skipping an optimizer step -------------------------------------------------------------------


@dataclass
class SkippedStep:
    """What :func:`skipping_step` yields: how often the optimizer's ``step`` was called (and ignored)."""

    skip: bool
    calls: int = 0


@contextlib.contextmanager
def skipping_step(optimizer: Any, skip: bool = True) -> Iterator[SkippedStep]:
    """Within the block, ``optimizer.step(...)`` does nothing when ``skip`` (an instance attribute
    shadows the method; any earlier instance-level ``step``, e.g. an LR scheduler's wrapper, is put
    back on exit). Patch the INNER optimizer (``engine.basic_optimizer``: torch AdamW, DeepSpeedCPUAdam),
    which DeepSpeed's ZeRO optimizers call, so their bookkeeping (gradient norm, partition copies,
    zero_grad) still runs while parameters and Adam moments stay unchanged."""
    record = SkippedStep(skip)
    if not skip:
        yield record
        return
    own = vars(optimizer)
    had, previous = "step" in own, own.get("step")

    def skipped_step(*args, **kwargs):
        record.calls += 1
        return None

    optimizer.step = skipped_step
    try:
        yield record
    finally:
        if had:
            optimizer.step = previous
        else:
            del optimizer.step
