"""The ``per_resblock_grad_scaling`` section of the DeepSpeed JSON (taken out before DeepSpeed parses
the config): settings of :mod:`.grad_scaling`, with the paper's defaults, validated key by key."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SECTION", "GradScalingConfigError", "ResblockScalingConfig"]

SECTION = "per_resblock_grad_scaling"
"""The DeepSpeed-JSON section :meth:`ResblockScalingConfig.from_ds_config` reads."""

_DTYPES = {"float16": torch.float16, "float32": torch.float32}


class GradScalingConfigError(ValueError):
    """A ``per_resblock_grad_scaling`` key or value is invalid; the message names it."""


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
    scale_with_ranks: bool = False
    """Multiply the three scale bounds by M, the data-parallel ranks, as the paper's formula does. The
    paper's per-GPU gradients are M times smaller than DeepSpeed's (each rank here differentiates its
    local mean loss and DeepSpeed averages over ranks), so M = 1 is the equivalent setting: the same
    scales at any rank count. With M it would start at 2^17-2^20 on 16-128 ranks, where the bench
    (scripts/bench_grad_scaling.py) shows activation gradients already overflowing and the 125-update
    cooldown then skips update after update."""
    compute_dtype: str = "float16"
    """dtype the transformer blocks run in under autocast: 'float16', or 'float32' (autocast off:
    for tests, where scaling must not change the gradients beyond rounding)."""

    def __post_init__(self):
        def require(cond: bool, key: str, why: str) -> None:
            if not cond:
                raise GradScalingConfigError(f"{SECTION}.{key}={getattr(self, key)!r}: {why}")

        require(isinstance(self.enabled, bool), "enabled", "must be true or false")
        require(isinstance(self.scale_with_ranks, bool), "scale_with_ranks", "must be true or false")
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
        """(initial, min, max) scale for ``world_size`` data-parallel ranks (see ``scale_with_ranks``)."""
        M = float(world_size) if self.scale_with_ranks else 1.0
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
