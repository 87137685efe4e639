"""DeepSpeed's universal checkpoints: a ZeRO checkpoint rewritten as one folder of fp32 values,
Adam moments and step per parameter, which an engine of any data-parallel size can load.

What DeepSpeed 0.19.8 leaves to its caller (read in its source): ``ds_to_universal`` asserts a
``universal_checkpoint_info`` entry in the checkpoint, which only Megatron-style trainers write (it
is injected here, as its ``--inject_missing_state`` flag does); it writes ``latest_universal`` beside
its output but no ``latest`` of its own; and an engine loads a universal checkpoint only when its
config said ``"checkpoint": {"load_universal": true}`` at construction, so :func:`load_universal`
turns that setting on for one load. A universal load restores the fp32 weights, the optimizer
state, the step and the LR scheduler (ZeRO 1/2 also the loss scaler, from ``zero/optimizer_state.pt``);
the client state comes from the copied model-states file. Anything else is the caller's.
"""

from __future__ import annotations

import argparse
import contextlib
import io
from pathlib import Path
from typing import Any

from .versions import _internal


def convert_to_universal(tag_dir: str | Path, out_dir: str | Path) -> None:
    """Write the universal form of the ZeRO checkpoint ``tag_dir`` into ``out_dir`` (serially: no
    worker processes forked from a rank that holds process groups). DeepSpeed's progress output is
    swallowed; its errors propagate."""
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(
        input_folder=str(tag_dir), output_folder=str(out_dir), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,
    )  # fmt: skip
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    (Path(out_dir).parent / "latest_universal").unlink(missing_ok=True)  # the tag is always given


def load_universal(engine, load_dir: str | Path, tag: str) -> tuple[str | None, dict[str, Any] | None]:
    """``engine.load_checkpoint(load_dir, tag)`` of a universal checkpoint, whatever the engine's
    config said about universal loading."""
    config = _internal(engine, "_config", "loading a universal checkpoint")
    _internal(config, "load_universal_checkpoint", "loading a universal checkpoint")
    before, config.load_universal_checkpoint = config.load_universal_checkpoint, True
    try:
        return engine.load_checkpoint(str(load_dir), tag=tag)
    finally:
        config.load_universal_checkpoint = before
