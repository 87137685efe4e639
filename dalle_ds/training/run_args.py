"""From command-line flags and a run YAML to a run config (:mod:`.run_config`).

Flags are generated from the config's fields: one per setting, named by the field's ``flag``
(default ``--field-name``), its help text and default shown in ``--help``. Precedence: flag >
``--config`` YAML > the field's default. Unknown keys, values of the wrong type, missing required
settings and invalid values raise :class:`RunConfigError` naming the key (and the YAML file).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from .run_config import RunConfig, RunConfigError

__all__ = [
    "arg_parser",
    "changed_settings",
    "flag_name",
    "parse_run_config",
    "resume_changes",
    "run_config_from_dict",
    "setting_fields",
    "shown_value",
]


def _is_section(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("section"))


def setting_fields(cls) -> list[tuple[str, dataclasses.Field, Any, Any]]:
    """(dotted key, field, default, type) of every setting of a run config class, sections expanded."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if _is_section(f):
            sub = f.default_factory()
            sub_hints = typing.get_type_hints(type(sub))
            for g in dataclasses.fields(sub):
                out.append((f"{f.name}.{g.name}", g, getattr(sub, g.name), sub_hints[g.name]))
        else:
            out.append((f.name, f, f.default, hints[f.name]))
    return out


def _base_type(hint) -> tuple[type, bool]:
    """(the value type, optional?) of a field's annotation."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        return inner, True
    return hint, False


def _coerce(key: str, value: Any, hint, where: str) -> Any:
    """A YAML value checked against the field's type (ints are accepted as floats)."""
    base, optional = _base_type(hint)
    if value is None:
        if optional:
            return None
        raise RunConfigError(f"{where}{key}: null is not allowed (expected {base.__name__})")
    origin = typing.get_origin(base)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(base)):
            raise RunConfigError(f"{where}{key}={value!r}: expected a list of {len(typing.get_args(base))} numbers")
        return tuple(_coerce(key, v, a, where) for v, a in zip(value, typing.get_args(base), strict=True))
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, base) or (base is int and isinstance(value, bool)):
        raise RunConfigError(f"{where}{key}={value!r}: expected {base.__name__}, got {type(value).__name__}")
    return value


def run_config_from_dict(cls, values: dict[str, Any], where: str = "") -> RunConfig:
    """Build ``cls`` from nested values (a YAML's, or :meth:`to_dict`'s): unknown keys, wrong types,
    missing required settings and invalid values raise :class:`RunConfigError` naming the key."""
    leaves = {key: (f, hint) for key, f, _, hint in setting_fields(cls)}
    sections = {f.name for f in dataclasses.fields(cls) if _is_section(f)}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in sections:
            if not isinstance(value, dict):
                raise RunConfigError(f"{where}{key}: expected a mapping of settings, got {type(value).__name__}")
            flat.update({f"{key}.{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(leaves))
    if unknown:
        raise RunConfigError(f"{where}unknown setting(s) {unknown} for the {cls.trainer} trainer; known: "
                             f"{sorted(leaves)}")  # fmt: skip
    flat = {k: _coerce(k, v, leaves[k][1], where) for k, v in flat.items()}
    missing = [k for k, (f, _) in leaves.items() if f.metadata.get("required") and flat.get(k) is None]
    if missing:
        flags = ", ".join(f"{flag_name(k, leaves[k][0])} ({k})" for k in missing)
        raise RunConfigError(f"missing required setting(s): {flags}; give them as flags or in --config")
    kwargs: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in flat.items():
        if "." in key:
            name, sub = key.split(".", 1)
            nested.setdefault(name, {})[sub] = value
        else:
            kwargs[key] = value
    for f in dataclasses.fields(cls):
        if _is_section(f):
            base = f.default_factory()
            try:
                kwargs[f.name] = dataclasses.replace(base, **nested.get(f.name, {}))
            except RunConfigError as err:
                raise RunConfigError(f"{where}{err}") from None
    return cls(**kwargs)


def flag_name(key: str, f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + key.rpartition(".")[2].replace("_", "-")


def shown_value(value) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value))
    return "none" if value is None else str(value)


def arg_parser(cls, description: str) -> argparse.ArgumentParser:
    """The trainer's command line: ``--config`` plus one flag per setting (defaults suppressed, so
    that the parsed namespace holds only what was given)."""
    p = argparse.ArgumentParser(description=description, argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="a run YAML with any of the settings below, by section (flags override it)")
    p.add_argument("--print-config", action="store_true", help="print the resolved run config as YAML and exit")
    launcher = p.add_argument_group("launcher")
    launcher.add_argument("--local_rank", type=int, help="set by the deepspeed launcher (the rank's local index)")
    launcher.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed's conventions; no effect")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for key, f, default, hint in setting_fields(cls):
        name = key.partition(".")[0] if "." in key else "run"
        group = groups.setdefault(name, p.add_argument_group(name))
        base, _ = _base_type(hint)
        shown = "required" if f.metadata.get("required") else f"default: {shown_value(default)}"
        text = f"{f.metadata['help']} [{key}; {shown}]".replace("%", "%%")  # argparse formats help with %
        kw: dict[str, Any] = {"dest": key, "metavar": key.rpartition(".")[2].upper(), "help": text}
        if base is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is tuple:
            kw.update(type=float, nargs=len(typing.get_args(base)), metavar=tuple("AB"[: len(typing.get_args(base))]))
        else:
            kw["type"] = base
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
        group.add_argument(flag_name(key, f), **kw)
    return p


def _load_yaml(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise RunConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise RunConfigError(f"--config {path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise RunConfigError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    return data


def parse_run_config(cls, argv: list[str] | None = None, description: str = "") -> RunConfig:
    """Flags > ``--config`` YAML > defaults. ``--print-config`` prints the result and exits."""
    args = vars(arg_parser(cls, description or cls.__doc__ or "").parse_args(argv))
    values: dict[str, Any] = {}
    config_path = args.pop("config", None)
    if config_path:
        values = _load_yaml(config_path)
    for key, value in args.items():
        if key in ("local_rank", "deepspeed", "print_config"):
            continue
        if "." in key:
            name, sub = key.split(".", 1)
            current = values.get(name)
            values[name] = {**(current if isinstance(current, dict) else {}), sub: value}
        else:
            values[key] = value
    where = f"{config_path}: " if config_path else ""
    config = run_config_from_dict(cls, values, where=where)
    if args.get("print_config"):
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        raise SystemExit(0)
    return config


def changed_settings(before: dict[str, Any], after: dict[str, Any], prefix: str = "") -> list[str]:
    """``key: old -> new`` for every setting that differs between two nested dicts."""
    out = []
    for key in sorted(set(before) | set(after)):
        a, b = before.get(key, "(unset)"), after.get(key, "(unset)")
        if isinstance(a, dict) and isinstance(b, dict):
            out += changed_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def resume_changes(client: dict[str, Any], cfg: RunConfig, ds_config: dict[str, Any]) -> list[str]:
    """Settings of a resumed run that differ from those its checkpoint's client state was written
    with: the run config and the DeepSpeed JSON as written (the world size is not a setting, and
    ``checkpoint.resume`` is expected to change). Empty for checkpoints that predate saved configs."""
    if "run_config" not in client:
        return []
    before = {**client["run_config"], "deepspeed": client.get("deepspeed_config", {})}
    now = {**cfg.to_dict(), "deepspeed": ds_config}
    for settings in (before, now):
        settings["checkpoint"] = {k: v for k, v in settings.get("checkpoint", {}).items() if k != "resume"}
    return changed_settings(before, now)
