"""Errors raised by more than one module of :mod:`dalle_ds.distributed` (kept here, importing
nothing, so that each of those modules can import them without importing the others)."""

__all__ = ["CommHookError"]


class CommHookError(ValueError):
    """A ``communication_hook`` section is invalid, or the engine cannot take the hook; the message
    names the key."""
