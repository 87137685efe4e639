"""DeepSpeed glue: config loading and validation, engine construction, activation checkpointing.

Everything DeepSpeed-specific lives here (and in the trainer), never in the model files. The
engine policy (ZeRO stage, precision, offload, activation checkpointing, monitors) comes from the
DeepSpeed JSON alone; batch sizes come from the trainer, which fills the JSON's batch keys.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch

from .collectives import TorchCollectives, init_distributed  # noqa: F401  (re-exported)

__all__ = [
    "DeepSpeedConfigError",
    "TorchCollectives",
    "apply_activation_checkpointing",
    "backward",
    "loss_scale",
    "build_engine",
    "load_ds_config",
    "prepare_ds_config",
    "zero_stage",
]

BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
# Sections dalle-ds reads itself; DeepSpeed ignores unknown top-level keys, but we strip them anyway
# so the engine sees only its own schema.
OWN_SECTIONS = ("communication_hook",)


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


def _enabled(config: dict[str, Any], section: str) -> bool:
    value = config.get(section, {})
    return bool(value.get("enabled", False)) if isinstance(value, dict) else False


def _resolve(config: dict, key: str, given: int | None, source: str) -> int | None:
    """The batch key's value: the trainer's if given; the JSON must agree or say "auto"."""
    value = config.get(key, "auto")
    if value == "auto" or value is None:
        return given
    if not isinstance(value, int) or value < 1:
        raise DeepSpeedConfigError(f'{source}: {key}={value!r} must be a positive integer or "auto"')
    if given is not None and given != value:
        raise DeepSpeedConfigError(
            f"{source}: {key}={value} conflicts with the trainer's value {given}; set it in one place "
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
) -> dict[str, Any]:
    """Validate a DeepSpeed config and fill its batch keys; returns a new dict for ``deepspeed.initialize``.

    ``train_batch_size = train_micro_batch_size_per_gpu * gradient_accumulation_steps * world_size``
    must hold; keys left ``"auto"`` are filled from the trainer's values. Also refuses settings
    known to be broken in DeepSpeed 0.19 (see DESIGN.md section 9) with an explanation.
    """
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
    micro = _resolve(cfg, "train_micro_batch_size_per_gpu", micro_batch_size, source)
    accum = _resolve(cfg, "gradient_accumulation_steps", gradient_accumulation_steps, source)
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
            f"{source}: 'optimizer'/'scheduler' sections are set by the trainer (the paper's AdamW and "
            f"schedules); remove them from the JSON"
        )
    return cfg


def apply_activation_checkpointing(blocks: torch.nn.ModuleList, ds_config: dict[str, Any]) -> bool:
    """Recompute each residual block in backward, through ``deepspeed.checkpointing``.

    Driven by the config's ``activation_checkpointing`` section (present = on): partitioned and
    CPU checkpointing, contiguous buffers and ``number_checkpoints`` are passed to DeepSpeed as set.
    Returns whether checkpointing was applied.
    """
    ac = ds_config.get("activation_checkpointing")
    if ac is None:
        return False
    import deepspeed

    deepspeed.checkpointing.configure(
        None,
        partition_activations=bool(ac.get("partition_activations", False)),
        contiguous_checkpointing=bool(ac.get("contiguous_memory_optimization", False)),
        num_checkpoints=ac.get("number_checkpoints") or len(blocks),
        checkpoint_in_cpu=bool(ac.get("cpu_checkpointing", False)),
        synchronize=bool(ac.get("synchronize_checkpoint_boundary", False)),
        profile=bool(ac.get("profile", False)),
    )
    for block in blocks:
        if getattr(block, "_dalle_ds_checkpointed", False):
            continue
        inner = block.forward

        def forward(x, _inner=inner):
            if torch.is_grad_enabled() and x.requires_grad:
                return deepspeed.checkpointing.checkpoint(_inner, x)
            return _inner(x)

        block.forward = forward
        block._dalle_ds_checkpointed = True
    return True


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], optimizer, lr_scheduler=None):
    """``deepspeed.initialize`` with a prepared config and the trainer's optimizer and scheduler."""
    import deepspeed

    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config
    )
    return engine, optimizer, lr_scheduler


def loss_scale(engine) -> float | None:
    """The optimizer's current fp16 loss scale, or None when it has none (fp32 / bf16)."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    config = getattr(opt, "loss_scale_config", None)
    if config is not None and getattr(config, "cur_scale", None) is not None:
        return float(config.cur_scale)
    for attr in ("loss_scale", "cur_scale"):
        value = getattr(opt, attr, None)
        if isinstance(value, (int, float, torch.Tensor)):
            return float(value)
    return None


def backward(engine, loss: torch.Tensor) -> None:
    """``engine.backward(loss)``, working around DeepSpeed 0.19's ZeRO-0 fp16 bug.

    At ZeRO stage 0 with fp16 the engine never multiplies the loss by the loss scale (only ZeRO
    optimizers do) while FP16_Optimizer still divides the gradients by it: every update would be
    ~65536x too small. We apply the scale ourselves in that one case.
    """
    if engine.fp16_enabled() and engine.zero_optimization_stage() == 0:
        scale = loss_scale(engine)
        if scale is not None:
            loss = loss.float() * scale
    engine.backward(loss)
    hook = getattr(engine, "_dalle_ds_comm_hook", None)
    if hook is not None and engine.zero_optimization_stage() == 0 and engine.is_gradient_accumulation_boundary():
        # ZeRO-0 with a communication hook: the engine's all-reduce is off; average here, before step().
        grads = [(name, p.grad) for name, p in engine.module.named_parameters() if p.grad is not None]
        hook.reduce(grads, scale=loss_scale(engine) or 1.0)


def after_skipped_step(engine) -> None:
    """Repair what DeepSpeed 0.19.8's ZeRO-3 leaves undone when an fp16 step overflows.

    ``DeepSpeedZeroOptimizer_Stage3.step`` partitions every parameter, then returns early on an
    overflow, before ``_post_step`` gathers the persistent (small, never-sharded) parameters again.
    The next forward then fetches them outside the recorded prefetch trace, and when the trace was
    recorded while they were gathered (the first step after loading a checkpoint is an overflow)
    backward fails with "tracing error ... expected the next 1 parameters in the parameter fetch
    queue". Gathering them here restores what a completed step leaves.
    """
    if engine.zero_optimization_stage() != 3:
        return
    persistent = getattr(engine.optimizer, "persistent_parameters", None)
    if persistent:
        persistent[0].all_gather(persistent)


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
