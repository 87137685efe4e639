"""The scaler: autograd boundaries around each res block, parameter-gradient hooks, the step protocol
(check, update) and its state. See the package docstring for the scheme."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .config import ResblockScalingConfig

__all__ = ["GradScalingError", "ResblockGradScaler"]


class GradScalingError(RuntimeError):
    """The scaler cannot be installed or used as asked (wrong parameter dtype, wrong call order...)."""


# --- autograd boundaries --------------------------------------------------------------------------


class _ScaleIn(torch.autograd.Function):
    """At a branch's output: forward casts the branch output to the stream dtype (fp32); backward
    multiplies the incoming unscaled gradient by the branch's scale in fp32, then casts it to the
    branch's dtype, so it enters the fp16 branch scaled (an overflow there becomes Inf and is caught
    at the branch's input)."""

    @staticmethod
    def forward(ctx, x, scaler, index, stream_dtype):
        ctx.scaler, ctx.index, ctx.in_dtype = scaler, index, x.dtype
        return x.to(stream_dtype) if x.dtype != stream_dtype else x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        scales, _ = ctx.scaler._device_state(grad.device)
        return (grad.to(torch.float32) * scales[ctx.index]).to(ctx.in_dtype), None, None, None


class _ScaleOut(torch.autograd.Function):
    """At a branch's input: identity forward; backward divides by the branch's scale, zeroes
    Inf/NaN and flags the branch (on the device: no host sync)."""

    @staticmethod
    def forward(ctx, x, scaler, index):
        ctx.scaler, ctx.index = scaler, index
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.scaler._unscale(grad, ctx.index), None, None


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


# --- the scaler -----------------------------------------------------------------------------------


@dataclass
class _Segment:
    name: str
    scaled: bool
    params: list[nn.Parameter]


class ResblockGradScaler:
    """One gradient scale per res block (branch), plus unscaled segments that are only checked.

    Generic machinery: :meth:`add_branch` registers a branch by its entry module (the first module
    its input passes through, e.g. the pre-norm), its exit module (whose output is added to the
    residual stream) and its parameters; :meth:`add_unscaled` covers parameters outside branches;
    :meth:`autocast_forward` makes a module run in ``config.compute_dtype``. The DALL-E layout is
    installed by :func:`install_resblock_scaling`.

    State lives on the host (float64 scales, counters: exact and deterministic); the backward
    hooks read a float32 copy of the scales and write the non-finite flags on the gradients' device.
    """

    def __init__(self, config: ResblockScalingConfig, world_size: int = 1):
        if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
            raise GradScalingError(f"world_size={world_size!r}: must be a positive integer (data-parallel ranks)")
        self.config = config
        self.world_size = world_size
        self.initial_scale, self.min_scale, self.max_scale = config.scale_bounds(world_size)
        self.segments: list[_Segment] = []
        self._scales: list[float] = []  # per segment; unscaled segments keep 1.0
        self._last_decrease: list[int | None] = []  # update index of the segment's last back-off
        self._nonfinite_counts: list[int] = []  # checks in which the segment was flagged
        self.updates = 0  # check/update cycles, skipped ones included
        self.skipped = 0  # updates skipped for a non-finite gradient
        self.last_nonfinite: list[str] = []  # segments flagged at the latest check
        self._pending: list[bool] | None = None  # flags fetched by check(), consumed by update()
        self._dev_scales: torch.Tensor | None = None
        self._flags: torch.Tensor | None = None
        self._param_ids: set[int] = set()
        self._handles: list[Any] = []
        self._wrapped: list[tuple[nn.Module, Callable]] = []

    # -- building -----------------------------------------------------------------------------

    def _add_segment(self, name: str, params: Iterable[nn.Parameter], scaled: bool) -> int:
        if any(s.name == name for s in self.segments):
            raise GradScalingError(f"segment {name!r} registered twice")
        if self._dev_scales is not None:
            raise GradScalingError(f"segment {name!r}: segments must be added before the first backward")
        params = [p for p in params if p.requires_grad]
        for p in params:
            if p.dtype != torch.float32:
                raise GradScalingError(
                    f"segment {name!r}: a parameter of shape {tuple(p.shape)} is {p.dtype}; per-resblock "
                    f"scaling needs fp32 parameters (it runs fp16 compute under autocast; keep DeepSpeed's "
                    f"fp16/bf16 off)"
                )
            if id(p) in self._param_ids:
                raise GradScalingError(f"segment {name!r}: a parameter of shape {tuple(p.shape)} is in two segments")
        index = len(self.segments)
        self.segments.append(_Segment(name, scaled, params))
        self._scales.append(self.initial_scale if scaled else 1.0)
        self._last_decrease.append(None)
        self._nonfinite_counts.append(0)
        for p in params:
            self._param_ids.add(id(p))
            self._handles.append(p.register_hook(self._param_hook(index)))
        return index

    def add_branch(self, name: str, entry: nn.Module, exit: nn.Module, params: Iterable[nn.Parameter]) -> int:
        """A res block: ``stream + exit(... entry(stream) ...)``. Its gradient is scaled from ``exit``'s
        output back to ``entry``'s first input; ``params`` (the branch's parameters) are unscaled by
        tensor hooks. Returns the segment index."""
        index = self._add_segment(name, params, scaled=True)

        def unscale_at_entry(module, args, kwargs):
            if not args or not isinstance(args[0], torch.Tensor):
                raise GradScalingError(f"branch {name!r}: {type(module).__name__}'s first input must be a tensor")
            return (_ScaleOut.apply(args[0], self, index), *args[1:]), kwargs

        def scale_at_exit(module, args, output):
            if not isinstance(output, torch.Tensor):
                raise GradScalingError(f"branch {name!r}: {type(module).__name__} must return one tensor")
            stream = torch.float32 if output.dtype in (torch.float16, torch.bfloat16) else output.dtype
            return _ScaleIn.apply(output, self, index, stream)

        self._handles.append(entry.register_forward_pre_hook(unscale_at_entry, with_kwargs=True))
        self._handles.append(exit.register_forward_hook(scale_at_exit))
        return index

    def add_unscaled(self, name: str, params: Iterable[nn.Parameter]) -> int:
        """Parameters outside any branch (fp32 compute): their gradients are checked, filtered, flagged."""
        return self._add_segment(name, params, scaled=False)

    def autocast_forward(self, module: nn.Module) -> None:
        """Run ``module.forward`` under autocast to ``config.compute_dtype`` (fp32: autocast off), entered
        inside the forward so activation checkpointing applied later recomputes in the same dtype."""
        if "forward" in vars(module):
            raise GradScalingError(
                f"{type(module).__name__}.forward is already wrapped (activation checkpointing?): install "
                f"per-resblock scaling before anything wraps the blocks' forward"
            )
        inner = module.forward
        dtype = self.config.dtype

        def forward(*args, **kwargs):
            x = _first_tensor(args, kwargs)
            device_type = x.device.type if x is not None else "cpu"
            if dtype == torch.float32:
                with torch.autocast(device_type, enabled=False):
                    return inner(*args, **kwargs)
            with torch.autocast(device_type, dtype=dtype):
                return inner(*args, **kwargs)

        forward._grad_scaling_wrapper = True
        module.forward = forward
        self._wrapped.append((module, forward))

    def remove(self) -> None:
        """Remove every hook and forward wrapper (e.g. before exporting or evaluating in fp32)."""
        for module, forward in self._wrapped:
            if vars(module).get("forward") is not forward:
                raise GradScalingError(
                    f"{type(module).__name__}.forward was wrapped again after installing (activation "
                    f"checkpointing?); unwrap that first"
                )
        for module, _ in self._wrapped:
            del module.forward
        self._wrapped.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    # -- backward side (no host sync) -----------------------------------------------------------

    def _device_state(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self._dev_scales is None or self._dev_scales.device != device:
            n = len(self.segments)
            flags = torch.zeros(n, dtype=torch.bool) if self._flags is None else self._flags
            self._flags = flags.to(device)
            self._dev_scales = torch.tensor(self._scales, dtype=torch.float32).to(device)
        return self._dev_scales, self._flags

    def _unscale(self, grad: torch.Tensor, index: int) -> torch.Tensor:
        scales, flags = self._device_state(grad.device)
        g = grad / scales[index] if self.segments[index].scaled else grad
        flags[index].logical_or_(~torch.isfinite(g).all())
        return torch.nan_to_num(g, nan=0.0, posinf=0.0, neginf=0.0)

    def _param_hook(self, index: int):
        def hook(grad: torch.Tensor) -> torch.Tensor:
            if grad.dtype != torch.float32:
                raise GradScalingError(
                    f"segment {self.segments[index].name!r}: a parameter gradient is {grad.dtype}, expected "
                    f"float32; per-resblock scaling needs fp32 parameters (DeepSpeed's fp16/bf16 must be off)"
                )
            return self._unscale(grad, index)

        return hook

    # -- step protocol ------------------------------------------------------------------------

    def check(self, all_reduce: Callable[[torch.Tensor], Any] | None = None) -> bool:
        """Whether any gradient since the last :meth:`update` was non-finite (then skip the step).

        Call once per optimizer step, at the accumulation boundary, after the last backward and
        before the step. ``all_reduce(t)`` must reduce the float32 flag vector ``t`` with MAX over
        the data-parallel ranks, in place or by returning the result (required when world_size > 1,
        so every rank takes the same decision). One host sync.
        """
        if self.world_size > 1 and all_reduce is None:
            raise GradScalingError(
                f"check(): world_size={self.world_size} needs all_reduce, so that every rank skips the same steps"
            )
        flags = self._flags if self._flags is not None else torch.zeros(len(self.segments), dtype=torch.bool)
        vector = flags.to(torch.float32)
        if all_reduce is not None:
            out = all_reduce(vector)
            if isinstance(out, torch.Tensor):
                vector = out
        self._pending = [bool(v) for v in vector.cpu().tolist()]
        self.last_nonfinite = [s.name for s, bad in zip(self.segments, self._pending, strict=True) if bad]
        return bool(self.last_nonfinite)

    def update(self) -> None:
        """After the (possibly skipped) optimizer step: clean -> every scale grows; non-finite ->
        flagged branches back off (cooldown and floor permitting), the others stay. Resets the flags."""
        if self._pending is None:
            raise GradScalingError("update() without check(): call check() before the step and update() after it")
        cfg, u = self.config, self.updates
        if not any(self._pending):
            for k, seg in enumerate(self.segments):
                if seg.scaled:
                    self._scales[k] = min(self._scales[k] * cfg.growth_factor, self.max_scale)
        else:
            self.skipped += 1
            for k, (seg, bad) in enumerate(zip(self.segments, self._pending, strict=True)):
                if not bad:
                    continue
                self._nonfinite_counts[k] += 1
                last = self._last_decrease[k]
                if seg.scaled and (last is None or u - last >= cfg.backoff_cooldown):
                    self._scales[k] = max(self._scales[k] / cfg.backoff_factor, self.min_scale)
                    self._last_decrease[k] = u
        self.updates += 1
        self._pending = None
        self._sync_device()

    def _sync_device(self) -> None:
        if self._flags is not None:
            self._flags.zero_()
        if self._dev_scales is not None:
            self._dev_scales.copy_(torch.tensor(self._scales, dtype=torch.float32))

    # -- inspection and checkpoints -----------------------------------------------------------

    @property
    def scales(self) -> dict[str, float]:
        """Current scale of every branch (scaled segment), by name."""
        return {s.name: v for s, v in zip(self.segments, self._scales, strict=True) if s.scaled}

    def set_scale(self, name: str, value: float) -> None:
        """Set one branch's scale (clamped); for tests and manual intervention, between steps."""
        k = self._index(name)
        if not self.segments[k].scaled:
            raise GradScalingError(f"segment {name!r} is unscaled")
        self._scales[k] = min(max(float(value), self.min_scale), self.max_scale)
        self._sync_device()

    def _index(self, name: str) -> int:
        for k, seg in enumerate(self.segments):
            if seg.name == name:
                return k
        raise GradScalingError(f"no segment {name!r}; segments: {[s.name for s in self.segments]}")

    def stats(self) -> dict[str, float | int]:
        """Scalars for metrics.jsonl: min / median / max branch scale, updates and skipped updates."""
        values = list(self.scales.values()) or [1.0]
        return {
            "grad_scale_min": min(values),
            "grad_scale_median": statistics.median(values),
            "grad_scale_max": max(values),
            "grad_scale_updates": self.updates,
            "grad_scale_skipped": self.skipped,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything :meth:`load_state_dict` needs for an exact resume (plain Python values).
        Save between steps (after :meth:`update`): pending flags are not saved."""
        return {
            "format": 1,
            "segments": [s.name for s in self.segments],
            "scales": list(self._scales),
            "last_decrease": list(self._last_decrease),
            "nonfinite_counts": list(self._nonfinite_counts),
            "updates": self.updates,
            "skipped": self.skipped,
            "world_size": self.world_size,
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str | None = None) -> None:
        """Restore :meth:`state_dict`'s output; ``device``: where the backward hooks will run (optional,
        the first backward moves the state there anyway). Scales are clamped to this run's bounds
        (they differ when world_size or the config changed)."""
        if state.get("format") != 1:
            raise GradScalingError(f"grad scaler state format {state.get('format')!r}: expected 1")
        names = [s.name for s in self.segments]
        if state["segments"] != names:
            raise GradScalingError(
                f"grad scaler state has segments {state['segments']}, this model has {names}: "
                f"a different layer count or layout"
            )
        self._scales = [
            min(max(float(v), self.min_scale), self.max_scale) if seg.scaled else 1.0
            for seg, v in zip(self.segments, state["scales"], strict=True)
        ]
        self._last_decrease = [None if v is None else int(v) for v in state["last_decrease"]]
        self._nonfinite_counts = [int(v) for v in state["nonfinite_counts"]]
        self.updates, self.skipped = int(state["updates"]), int(state["skipped"])
        self._pending, self.last_nonfinite = None, []
        if device is not None:
            self._dev_scales = None
            self._flags = None
            self._device_state(torch.device(device))
        self._sync_device()
