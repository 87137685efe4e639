"""The training step's uses of DeepSpeed internals: the loss scale, the ZeRO-0 fp16 fix, skipped
steps, the communication hook's reduction point, the optimizers an engine steps, monitors."""

from __future__ import annotations

import torch

from ..errors import CommHookError
from .versions import DeepSpeedInternalsError, _internal, _version


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
    raise DeepSpeedInternalsError(
        f"DeepSpeed {_version()}: {type(opt).__name__} has no loss_scale_config.cur_scale, loss_scale or "
        f"cur_scale; dalle-ds reads the fp16 loss scale from one of them"
    )


def skipped_steps(engine) -> int:
    """Optimizer steps the engine skipped (fp16 overflow) since it was built."""
    return int(_internal(engine, "skipped_steps", "counting skipped fp16 steps"))


def backward(engine, loss: torch.Tensor) -> None:
    """``engine.backward(loss)``, working around DeepSpeed 0.19's ZeRO-0 fp16 bug.

    At ZeRO stage 0 with fp16 the engine never multiplies the loss by the loss scale (only ZeRO
    optimizers do) while FP16_Optimizer still divides the gradients by it: every update would be
    ~65536x too small. We apply the scale ourselves in that one case. With a communication hook at
    ZeRO-0 the engine's all-reduce is off and the hook averages the gradients here, at the
    accumulation boundary, before ``engine.step()``.
    """
    if engine.fp16_enabled() and engine.zero_optimization_stage() == 0:
        scale = loss_scale(engine)
        if scale is not None:
            loss = loss.float() * scale
    engine.backward(loss)
    hook = getattr(engine, "_dalle_ds_comm_hook", None)
    if hook is not None and engine.zero_optimization_stage() == 0 and engine.is_gradient_accumulation_boundary():
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
    persistent = _internal(engine.optimizer, "persistent_parameters", "re-gathering after a skipped ZeRO-3 step")
    if persistent:
        persistent[0].all_gather(persistent)


def attach_comm_hook(engine, hook) -> None:
    """Route the engine's data-parallel gradient reduction through ``hook.reduce(named_grads, scale=)``.

    ZeRO 1/2: every gradient bucket the optimizer would all-reduce goes to the hook instead (its
    ``reduce_scatter`` must be off, so every bucket passes ``gradient_reduction_w_predivide``). ZeRO 0:
    the engine's backward all-reduce is turned off and :func:`backward` calls the hook. ZeRO 3 is
    refused: it reduce-scatters partitioned gradients, with no per-matrix view to compress. The hook's
    ``skips_non_finite`` is set when the engine skips overflowed steps (fp16), its ``train_dtype`` to
    the engine's precision (fp16 / bf16; fp32 otherwise).
    """
    stage = engine.zero_optimization_stage()
    if stage == 3:
        raise CommHookError(
            "communication_hook: ZeRO stage 3 is not supported (its reduce-scatter of partitioned "
            "gradients has no per-matrix view to compress); use stage 0, 1 or 2"
        )
    hook.skips_non_finite = engine.fp16_enabled()  # DeepSpeed's fp16 optimizers skip overflowed steps
    if engine.fp16_enabled():  # the precision the hook's error_dtype "auto" follows
        hook.train_dtype = torch.float16
    elif engine.bfloat16_enabled():
        hook.train_dtype = torch.bfloat16
    if stage == 0:
        _internal(engine, "enable_backward_allreduce", "turning the engine's all-reduce off for the hook")
        engine.enable_backward_allreduce = False
        engine._dalle_ds_comm_hook = hook
        return
    opt = engine.optimizer
    if not all(hasattr(opt, name) for name in ("gradient_reduction_w_predivide", "ipg_buckets", "bit16_groups")):
        raise CommHookError(
            f"communication_hook: the engine's optimizer {type(opt).__name__} does not reduce gradients in "
            f"buckets (DeepSpeed picks BF16_Optimizer for bf16 at ZeRO stage 1 with data_types.grad_accum_dtype "
            f"fp32); use ZeRO stage 0 or 2, or accumulate gradients in bf16"
        )
    if getattr(opt, "reduce_scatter", False):
        raise CommHookError("communication_hook with ZeRO 1/2 needs zero_optimization.reduce_scatter=false")

    def reduce_bucket(tensor: torch.Tensor, communication_data_type: torch.dtype):
        bucket = opt.ipg_buckets[communication_data_type]
        views, offset = [], 0
        for group, index, param_id in bucket.params:
            p = opt.bit16_groups[group][index]
            views.append((param_id, tensor.narrow(0, offset, p.numel()).view(p.shape)))
            offset += p.numel()
        if offset != tensor.numel():  # a parameter larger than the bucket comes alone
            param = _internal(opt, "extra_large_param_to_reduce", "mapping buckets to parameters").get(
                communication_data_type
            )
            if param is None or param.numel() != tensor.numel():
                raise DeepSpeedInternalsError("communication hook: cannot map the gradient bucket to parameters")
            views = [(id(param), tensor.view(param.shape))]
        hook.reduce(views, scale=loss_scale(engine) or 1.0)  # fp16: the buckets hold scaled gradients
        return tensor

    opt.gradient_reduction_w_predivide = reduce_bucket
    engine._dalle_ds_comm_hook = hook


def inner_optimizers(engine) -> list:
    """The optimizers that change parameters and moments when the engine steps: the client optimizer
    (``engine.basic_optimizer``, which ZeRO 1-3 wrap and call) and ZeRO-3's ``backup_optimizer``
    (partial optimizer offload). Making their ``step`` a no-op skips an update while the engine's
    own bookkeeping (gradient norm, partition copies, zero_grad) still runs."""
    found = [_internal(engine, "basic_optimizer", "skipping an update (per-resblock gradient scaling)")]
    backup = getattr(engine.optimizer, "backup_optimizer", None)
    if backup is not None:
        found.append(backup)
    return [opt for opt in found if opt is not None]


def write_monitor(engine, events: list[tuple[str, float, int]]) -> None:
    """Events to the monitors the config enables (csv_monitor, tensorboard, wandb, comet)."""
    if engine.monitor.enabled:
        engine.monitor.write_events(events)
