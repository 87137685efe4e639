"""The DeepSpeed JSON: loading, validation and the batch keys.

The engine policy (ZeRO stage, precision, offload, activation checkpointing, monitors) comes from
the DeepSpeed JSON alone; batch sizes come from the trainer, which fills the JSON's batch keys.
Sections dalle-ds reads itself (``communication_hook``) are taken out before DeepSpeed sees the
config. Settings known to break DeepSpeed 0.19 are refused here with the reason
(``docs/design.md``, "DeepSpeed 0.19").
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

__all__ = [
    "OWN_SECTIONS",
    "DeepSpeedConfigError",
    "load_ds_config",
    "optimizer_offloaded",
    "prepare_ds_config",
    "zero_stage",
]

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# Sections dalle-ds reads itself; DeepSpeed ignores unknown top-level keys, but we strip them anyway
# so the engine sees only its own schema.
OWN_SECTIONS = ("communication_hook", "per_resblock_grad_scaling")


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config is invalid or unsafe; the message names the file and keys."""


def load_ds_config(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON config (strict JSON: errors give the line and column)."""
    path = Path(path)
    if not path.is_file():
        raise DeepSpeedConfigError(f"DeepSpeed config {path} does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DeepSpeedConfigError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(f"{path}: expected a JSON object at the top level")
    return config


def zero_stage(config: dict[str, Any]) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def optimizer_offloaded(config: dict[str, Any]) -> bool:
    """Whether ZeRO keeps optimizer states on the CPU (``zero_optimization.offload_optimizer.device``)."""
    offload = config.get("zero_optimization", {}).get("offload_optimizer", {}) or {}
    return offload.get("device") == "cpu"


def _enabled(config: dict[str, Any], section: str) -> bool:
    value = config.get(section, {})
    return bool(value.get("enabled", False)) if isinstance(value, dict) else False


def _resolve(config: dict, key: str, given: int | None, source: str, given_as: str) -> int | None:
    """The batch key's value: the trainer's if given; the JSON must agree or say "auto"."""
    value = config.get(key, "auto")
    if value == "auto" or value is None:
        return given
    if not isinstance(value, int) or value < 1:
        raise DeepSpeedConfigError(f'{source}: {key}={value!r} must be a positive integer or "auto"')
    if given is not None and given != value:
        raise DeepSpeedConfigError(
            f"{source}: {key}={value} conflicts with {given_as}={given}; set it in one place "
            f'("auto" in the JSON lets the trainer fill it)'
        )
    return value


def _divide(total: int, key: str, value: int, world_size: int, source: str) -> int:
    """The missing batch factor: train_batch_size / (the known one x world size), which must divide."""
    if total % (value * world_size):
        raise DeepSpeedConfigError(
            f"{source}: train_batch_size={total} is not divisible by {key}={value} x world size {world_size}"
        )
    return total // (value * world_size)


def prepare_ds_config(
    config: dict[str, Any],
    *,
    world_size: int,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    source: str = "DeepSpeed config",
    given_as: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Validate a DeepSpeed config and fill its batch keys; returns a new dict for ``deepspeed.initialize``.

    ``train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * world_size``
    must hold; keys left ``"auto"`` are filled from the trainer's values. Also refuses settings
    known to be broken in DeepSpeed 0.19 with an explanation. ``given_as`` names where the
    trainer's batch values come from (e.g. ``{"train_micro_batch_size_per_gpu": "--micro-batch-size"}``),
    for the error when the JSON gives another value.
    """
    given_as = given_as or {}
    cfg = copy.deepcopy(config)
    hook = cfg.get("communication_hook")
    for section in OWN_SECTIONS:
        cfg.pop(section, None)
    if hook:
        zero = cfg.setdefault("zero_optimization", {})
        stage = int(zero.get("stage", 0))
        if stage == 3:
            raise DeepSpeedConfigError(
                f"{source}: communication_hook with zero_optimization.stage=3 is not supported (ZeRO-3 "
                f"reduce-scatters partitioned gradients); use stage 0, 1 or 2"
            )
        if stage in (1, 2):
            if zero.get("reduce_scatter", False):
                raise DeepSpeedConfigError(
                    f"{source}: communication_hook needs zero_optimization.reduce_scatter=false (the hook "
                    f"replaces the all-reduce of each gradient bucket)"
                )
            zero["reduce_scatter"] = False
            zero["contiguous_gradients"] = True
    micro_key, accum_key = "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"
    micro = _resolve(cfg, micro_key, micro_batch_size, source, given_as.get(micro_key, "the trainer's value"))
    trainer = "the trainer's value"
    accum = _resolve(cfg, accum_key, gradient_accumulation_steps, source, given_as.get(accum_key, trainer))
    total = cfg.get("train_batch_size", "auto")
    if total not in ("auto", None) and (not isinstance(total, int) or total < 1):
        raise DeepSpeedConfigError(f'{source}: train_batch_size={total!r} must be a positive integer or "auto"')
    total = None if total in ("auto", None) else total
    if micro is None and accum is None and total is None:
        raise DeepSpeedConfigError(f"{source}: no batch size: set train_micro_batch_size_per_gpu or pass one")
    accum = accum if accum is not None else (1 if micro is None or total is None else None)
    if micro is None:
        micro = _divide(total, "gradient_accumulation_steps", accum, world_size, source)
    if accum is None:
        accum = _divide(total, "train_micro_batch_size_per_gpu", micro, world_size, source)
    expected = micro * accum * world_size
    if total is not None and total != expected:
        raise DeepSpeedConfigError(
            f"{source}: train_batch_size={total} != train_micro_batch_size_per_gpu={micro} x "
            f"gradient_accumulation_steps={accum} x world size {world_size} = {expected}"
        )
    cfg.update(train_batch_size=expected, train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)

    stage = zero_stage(cfg)
    if stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(f"{source}: zero_optimization.stage={stage} must be 0, 1, 2 or 3")
    fp16, bf16 = _enabled(cfg, "fp16"), _enabled(cfg, "bf16")
    if fp16 and bf16:
        raise DeepSpeedConfigError(f"{source}: fp16.enabled and bf16.enabled are both true; pick one")
    ac = cfg.get("activation_checkpointing")
    if ac is not None:
        if not isinstance(ac, dict):
            raise DeepSpeedConfigError(f"{source}: activation_checkpointing must be an object")
        if ac.get("cpu_checkpointing") and not ac.get("partition_activations"):
            raise DeepSpeedConfigError(
                f"{source}: activation_checkpointing.cpu_checkpointing=true needs partition_activations=true "
                f"(DeepSpeed 0.19 crashes in backward otherwise)"
            )
        if ac.get("contiguous_memory_optimization") and not ac.get("partition_activations"):
            raise DeepSpeedConfigError(
                f"{source}: activation_checkpointing.contiguous_memory_optimization=true needs "
                f"partition_activations=true"
            )
    if "optimizer" in cfg or "scheduler" in cfg:
        raise DeepSpeedConfigError(
            f"{source}: 'optimizer'/'scheduler' sections conflict with the run config's optimizer.* and "
            f"schedule.* settings (the paper's AdamW and schedules: --lr, --betas, --warmup-steps, ...); remove "
            f"them from the JSON"
        )
    return cfg
