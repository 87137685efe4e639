"""Whether the checkpoint ``--resume`` chose fits the run, judged from its marker before anything loads.

A checkpoint does not fit, and the run stops with one message naming it and the difference, when it
was written

- by the other trainer: its ``model_config``'s ``model_type`` is not the run's (a dVAE checkpoint
  resumed by the DALL-E trainer, or the reverse);
- for another model config (another preset, or an edited config file): every differing key with
  both values;
- with other frozen inputs than the run's (the DALL-E trainer's dVAE): the client state's ``frozen``
  names each by its path and the SHA-256 of its weights as loaded, and the digests must agree.

Another world size fits (the checkpoint is loaded through DeepSpeed's universal format, the global
batch kept: ``training/reshard.py``), and so does a changed setting (:func:`.run_args.resume_changes`
warns about those). Checkpoints written before ``frozen`` was recorded are not checked for it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .checkpointing import CheckpointError
from .run_args import changed_settings

__all__ = ["CheckpointMismatch", "fit_check", "weights_sha256"]


class CheckpointMismatch(CheckpointError):
    """The checkpoint ``--resume`` chose was written by another trainer, for another model or with
    other frozen inputs than the run's."""


def weights_sha256(module: torch.nn.Module) -> str:
    """SHA-256 of a module's state dict: every entry's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        digest.update(f"{name} {value.dtype} {tuple(value.shape)}\n".encode())
        digest.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # any dtype
    return digest.hexdigest()


def fit_check(
    model_config: dict[str, Any], frozen: dict[str, dict[str, str]]
) -> Callable[[Path, dict[str, Any]], None]:
    """The ``check`` of :meth:`.Checkpointer.load` for a run of ``model_config`` (its ``model_type`` is
    the trainer's kind) with ``frozen`` inputs (``{flag: {"path": ..., "sha256": ...}}``): it raises
    :class:`CheckpointMismatch` for a checkpoint folder whose marker does not fit."""

    def check(folder: Path, marker: dict[str, Any]) -> None:
        saved = marker.get("model_config") or {}
        kind, was = model_config["model_type"], saved.get("model_type", model_config["model_type"])
        if was != kind:
            raise CheckpointMismatch(
                f"--resume: {folder} is a {was} checkpoint, written by the {was} trainer; this is the {kind} "
                f"trainer. Resume it with the {was} trainer, or give this run another --output-dir."
            )
        problems = []
        if saved and (changes := changed_settings(saved, model_config)):
            preset = marker.get("run_config", {}).get("preset")
            written = f" (it was written with --preset {preset})" if preset else ""
            problems.append(f"another model config{written}, checkpoint -> this run: {', '.join(changes)}")
        for flag, now in frozen.items():
            then = marker.get("frozen", {}).get(flag)
            if then is not None and then["sha256"] != now["sha256"]:
                problems.append(
                    f"another --{flag}: {then['path']} (weights SHA-256 {then['sha256'][:16]}) when saved, "
                    f"{now['path']} ({now['sha256'][:16]}) now"
                )
        if problems:
            raise CheckpointMismatch(
                f"--resume: {folder} does not fit this run: {'; '.join(problems)}. Resume with what it was "
                f"written with, or start without --resume in another --output-dir."
            )

    return check
