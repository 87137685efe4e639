"""What every model config shares: the error type, field checks, and dict / YAML plumbing."""

from __future__ import annotations

import dataclasses
from dataclasses import fields
from typing import Any

__all__ = ["ConfigError"]


PRESET_LOOKUP: list = []
"""Holds :mod:`.config`'s preset lookup (name -> (config class, values)), set when it is imported."""


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


def _require(cond: bool, cls: type, name: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"{cls.__name__}.{name}={value!r}: {why}")


class _ConfigBase:
    """Shared dict / YAML plumbing for the config dataclasses."""

    kind: str = ""  # written into YAML so a file says which model it configures
    title: str = ""  # how messages and model cards name the model

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": self.kind, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>"):
        data = dict(data)
        kind = data.pop("model_type", cls.kind)
        if kind != cls.kind:
            raise ConfigError(f"{source}: model_type={kind!r}, expected {cls.kind!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown {cls.__name__} key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_name(cls, name: str, **overrides):
        """Build a named preset, optionally overriding fields (litgpt-style)."""
        preset_cls, values = PRESET_LOOKUP[0](name)
        if preset_cls is not cls:
            raise ConfigError(f"preset {name!r} is a {preset_cls.__name__}, not a {cls.__name__}")
        return cls.from_dict({**values, **overrides}, source=f"preset {name!r}")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)
