"""Per-resblock gradient scaling for fp16 training (DALL-E paper, Appendix D).

One global loss scale cannot serve a deep pre-norm transformer in fp16: the gradients of the
later res blocks are orders of magnitude larger than those of the earlier ones, so any single
scale either overflows late blocks or underflows early ones. Instead every res block (each
transformer layer has two: the attention branch and the MLP branch) gets its own scale ``s_k``:

- the gradient enters the fp16 branch multiplied by ``s_k`` (a boundary at the branch's output)
  and leaves it divided by ``s_k`` (a boundary at the branch's input), where Inf/NaN entries are
  zeroed and the branch is flagged; the identity (residual) path and the stream between branches
  carry unscaled fp32 gradients;
- the branch's parameter gradients are divided by ``s_k`` in fp32 (a tensor hook per parameter,
  which runs before the gradient is accumulated into ``.grad`` and before DeepSpeed's reduction
  hooks), non-finite entries zeroed and the branch flagged. DeepSpeed, PowerSGD and gradient
  clipping only ever see unscaled, finite gradients;
- ``s_k`` starts at ``M * 2**13`` (M: data-parallel ranks), grows by ``2**(1/1000)`` after every
  clean update and is divided by ``sqrt(2)`` when branch k produced a non-finite gradient, at most
  once per 125 updates per branch; the update is skipped whenever any gradient was non-finite.
  Scales are clamped to ``[M * 2**7, M * 2**24]``.

Precision scheme (AMP-style). Module parameters stay fp32. The scaler wraps each transformer
block's ``forward`` in ``torch.autocast(..., dtype=torch.float16)``, so the branches' matmuls run
in fp16 while LayerNorms, the residual stream (an fp16 branch output is cast to fp32 at its output
boundary before the residual add), the embeddings and the head (``ln_f``, the unembedding and the
logits) run in fp32, as the paper keeps them. Parameter gradients arrive in fp32 (the backward of
autocast's weight cast), where they are unscaled exactly. The trainer must NOT wrap the model's
forward in fp16 autocast itself: that would make the unembedding matmul, which ``F.linear`` casts
to fp16 under autocast, produce fp16 logits with unscaled gradients (the paper computes logits in
fp32). Non-block parameters (embeddings, ``ln_f``, unembeddings) form one unscaled segment,
``"rest"``: their gradients are only checked, filtered and flagged.

Use in a trainer (DeepSpeed's own ``fp16`` / ``bf16`` sections must be off: the engine runs fp32)::

    cfg = ResblockScalingConfig.from_ds_config(ds_config)           # None when the section is absent
    scaler = install_resblock_scaling(model, cfg, world_size=M)      # 1. before activation checkpointing
    ds_adapter.apply_activation_checkpointing(model.blocks, ...)     # 2. wraps the autocast forward
    engine = deepspeed.initialize(model=model, ...)                  # 3. hooks survive .to(device)
    for step ...:
        for micro_batch ...:
            engine.backward(engine(...).loss)                        # no autocast, no loss scaling here
        skip = scaler.check(all_reduce=lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX))  # 1 host sync
        with skipping_step(engine.basic_optimizer, skip):            # inner optimizer: step is a no-op
            engine.step()                                            # zero_grad etc. still run
        scaler.update()                                              # grow / back off, reset the flags
        metrics.update(scaler.stats())
    checkpoint client state: scaler.state_dict(); on resume scaler.load_state_dict(state, device)

Activation checkpointing (``deepspeed.checkpointing`` or ``torch.utils.checkpoint``) that wraps
``block.forward`` must be applied AFTER :func:`install_resblock_scaling`: the autocast context is
entered inside the wrapped forward, so a block recomputed in backward runs in fp16 exactly as its
forward did (DeepSpeed's checkpoint does not restore autocast state). Installing on a block whose
``forward`` is already wrapped raises :class:`GradScalingError`.

Limits the trainer has to handle (DeepSpeed does not know a step was skipped): the engine's LR
scheduler and ``global_steps`` still advance on a skipped step; a PowerSGD hook commits its error
feedback for the (filtered) gradients of a skipped step unless told to stage it; ZeRO-3 with partial
optimizer offload steps a second inner optimizer (``engine.optimizer.backup_optimizer``), which
:func:`skipping_step` must patch as well. The flags live until :meth:`ResblockGradScaler.update`:
save checkpoints between steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

__all__ = [
    "GradScalingConfigError",
    "GradScalingError",
    "ResblockGradScaler",
    "ResblockScalingConfig",
    "SkippedStep",
    "install_resblock_scaling",
    "skipping_step",
]

SECTION = "per_resblock_grad_scaling"
"""The DeepSpeed-JSON section :meth:`ResblockScalingConfig.from_ds_config` reads."""

_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class GradScalingConfigError(ValueError):
    """A ``per_resblock_grad_scaling`` key or value is invalid; the message names it."""


class GradScalingError(RuntimeError):
    """The scaler cannot be installed or used as asked (wrong parameter dtype, wrong call order...)."""


# --- configuration --------------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ResblockScalingConfig:
    """Settings of per-resblock gradient scaling; the defaults are the paper's (Appendix D).

    Scales are ``M * 2**power`` with M the data-parallel ranks, given at build time.
    """

    enabled: bool = True
    """Whether the trainer uses per-resblock scaling at all."""
    initial_scale_power: float = 13
    """Every scale starts at ``M * 2**initial_scale_power``."""
    min_scale_power: float = 7
    """Scales never fall below ``M * 2**min_scale_power``."""
    max_scale_power: float = 24
    """Scales never exceed ``M * 2**max_scale_power``."""
    doubling_interval: int = 1000
    """Clean updates per doubling: every clean update multiplies each scale by ``2**(1/doubling_interval)``."""
    backoff_factor: float = math.sqrt(2)
    """A branch that produced a non-finite gradient has its scale divided by this."""
    backoff_cooldown: int = 125
    """A branch's scale is divided at most once per this many updates (counting skipped ones); the
    update itself is skipped on every non-finite gradient. 0 or 1: no cooldown."""
    compute_dtype: str = "float16"
    """dtype the transformer blocks run in under autocast: 'float16', or 'float32' (autocast off:
    for tests, where scaling must not change the gradients beyond rounding)."""

    def __post_init__(self):
        def require(cond: bool, key: str, why: str) -> None:
            if not cond:
                raise GradScalingConfigError(f"{SECTION}.{key}={getattr(self, key)!r}: {why}")

        require(isinstance(self.enabled, bool), "enabled", "must be true or false")
        for key in ("initial_scale_power", "min_scale_power", "max_scale_power"):
            require(_is_number(getattr(self, key)), key, "must be a finite number")
        require(
            self.min_scale_power <= self.initial_scale_power,
            "initial_scale_power",
            f"must be >= min_scale_power={self.min_scale_power!r}",
        )
        require(
            self.initial_scale_power <= self.max_scale_power,
            "initial_scale_power",
            f"must be <= max_scale_power={self.max_scale_power!r}",
        )
        require(_is_int(self.doubling_interval) and self.doubling_interval >= 1, "doubling_interval", "must be >= 1")
        require(_is_number(self.backoff_factor) and self.backoff_factor > 1, "backoff_factor", "must be a number > 1")
        require(
            _is_int(self.backoff_cooldown) and self.backoff_cooldown >= 0,
            "backoff_cooldown",
            "must be an integer >= 0",
        )
        require(self.compute_dtype in _DTYPES, "compute_dtype", f"must be one of {sorted(_DTYPES)}")

    @property
    def growth_factor(self) -> float:
        return 2.0 ** (1.0 / self.doubling_interval)

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.compute_dtype]

    def scale_bounds(self, world_size: int) -> tuple[float, float, float]:
        """(initial, min, max) scale for ``world_size`` data-parallel ranks."""
        M = float(world_size)
        return (
            M * 2.0**self.initial_scale_power,
            M * 2.0**self.min_scale_power,
            M * 2.0**self.max_scale_power,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> ResblockScalingConfig:
        """Build from the ``per_resblock_grad_scaling`` section's dict; unknown keys raise."""
        if not isinstance(section, dict):
            raise GradScalingConfigError(f"{SECTION}: expected a mapping of keys, got {type(section).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        for key in section:
            if key not in known:
                raise GradScalingConfigError(
                    f"{SECTION}.{key}={section[key]!r}: unknown key; known keys: {sorted(known)}"
                )
        return cls(**section)

    @classmethod
    def from_ds_config(cls, ds_config: dict[str, Any]) -> ResblockScalingConfig | None:
        """The section of a DeepSpeed config dict, or None when it is absent. When enabled, DeepSpeed's
        own ``fp16`` / ``bf16`` must be off (the engine must keep fp32 parameters), else this raises."""
        if SECTION not in ds_config:
            return None
        config = cls.from_section(ds_config[SECTION])
        if config.enabled:
            for other in ("fp16", "bf16"):
                section = ds_config.get(other)
                if isinstance(section, dict) and section.get("enabled", False) not in (False, "auto"):
                    raise GradScalingConfigError(
                        f"{other}.enabled={section.get('enabled')!r}: must be false with {SECTION}.enabled=true "
                        f"(the scaler runs fp16 compute over fp32 parameters; DeepSpeed's {other} would cast them)"
                    )
        return config


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
        if not _is_int(world_size) or world_size < 1:
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
