"""The DeepSpeed versions dalle-ds supports, and the errors that name a moved internal."""

from __future__ import annotations

from typing import Any

SUPPORTED_DEEPSPEED = (">=0.19.8", "<0.20")  # keep equal to setup.py's requirement
"""The DeepSpeed range whose internals this module was written against and tested with."""



class DeepSpeedVersionError(RuntimeError):
    """The installed DeepSpeed is outside :data:`SUPPORTED_DEEPSPEED`."""


class DeepSpeedInternalsError(RuntimeError):
    """A DeepSpeed internal dalle-ds relies on is not where this module expects it."""


def _version() -> str:
    import deepspeed

    return deepspeed.__version__


def check_version(version: str | None = None) -> str:
    """Raise :class:`DeepSpeedVersionError` unless ``version`` (default: the installed one) is supported."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = version or _version()
    spec = SpecifierSet(",".join(SUPPORTED_DEEPSPEED))
    if Version(version).release is None or Version(version) not in spec:
        raise DeepSpeedVersionError(
            f"DeepSpeed {version} is not supported: dalle-ds needs deepspeed{spec} (it relies on internals "
            f"listed in dalle_ds/distributed/ds_adapter/). Install a supported version, e.g. "
            f"pip install 'deepspeed{spec}'"
        )
    return version


def _internal(obj: Any, name: str, what: str) -> Any:
    """``getattr(obj, name)``, or an error that names the missing internal and what needs it."""
    if not hasattr(obj, name):
        owner = obj.__name__ if isinstance(obj, type) or hasattr(obj, "__path__") else type(obj).__name__
        raise DeepSpeedInternalsError(
            f"DeepSpeed {_version()}: {owner}.{name} is missing; dalle-ds uses it for {what}. This "
            f"DeepSpeed moved an internal (supported: deepspeed{','.join(SUPPORTED_DEEPSPEED)})"
        )
    return getattr(obj, name)
