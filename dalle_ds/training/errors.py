"""Why a training run stops on purpose (the CLI prints these and exits with status 2)."""

from __future__ import annotations

__all__ = ["TrainingStopped", "UsageError"]


class UsageError(ValueError):
    """A command-line argument, or a combination of them, is invalid; the message names it."""


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (e.g. non-finite loss); a checkpoint was written first."""
