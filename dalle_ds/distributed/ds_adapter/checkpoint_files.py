"""DeepSpeed's checkpoint files as the streaming export reads them, and the
activation-checkpointing RNG tracker saved with every rank's RNG state."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch

from .versions import _internal

MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, ZeRO 3



def model_states_path(tag_dir: str | Path) -> Path | None:
    """The engine's model-states file in a checkpoint tag folder (ZeRO 0-2 or ZeRO-3 name), or None."""
    return next((Path(tag_dir) / n for n in MODEL_STATES if (Path(tag_dir) / n).is_file()), None)


def mapped_model_states(path: str | Path) -> dict[str, Any]:
    """A model-states file with its tensors memory-mapped (read only when touched), and the layout
    DeepSpeed records in it under its own key names: ``param_shapes`` (one ordered name -> shape
    dict per optimizer group), ``buffer_names``, ``frozen_param_shapes``, ``shared_params``."""
    from deepspeed.checkpoint import constants as c

    states = torch.load(path, map_location="cpu", mmap=True, weights_only=False)  # holds DeepSpeed objects
    return {
        "states": states,
        "param_shapes": states.get(c.PARAM_SHAPES) or [],
        "buffer_names": list(states.get(c.BUFFER_NAMES) or []),
        "frozen_param_shapes": dict(states.get(c.FROZEN_PARAM_SHAPES) or {}),
        "shared_params": dict(states.get("shared_params") or {}),
    }


def mapped_fp32_partitions(tag_dir: str | Path) -> tuple[int, int, list, list | None]:
    """(ZeRO stage, world size, each rank's fp32 flat partitions per group, alignment paddings) of a
    ZeRO 1-3 tag folder, parsed by DeepSpeed's ``zero_to_fp32`` (it memory-maps the optimizer files
    and drops the Adam moments unread)."""
    from deepspeed.utils import zero_to_fp32 as z

    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar, once per read
        return z.parse_optim_states(z.get_optim_files(str(tag_dir)), str(tag_dir))


def zero3_gather(partitions: list, group_offsets: list[int], offset: int, shape) -> tuple[torch.Tensor, int]:
    """(one ZeRO-3 parameter rebuilt from every rank's flat partition at ``offset`` by DeepSpeed's own
    ``GatheredTensor``, the numel each rank holds of it, padding included)."""
    from deepspeed.utils import zero_to_fp32 as z

    per_rank, _ = z.zero3_partitioned_param_info(shape.numel(), len(partitions))
    return z.GatheredTensor(partitions, group_offsets, offset, per_rank, shape).contiguous(), per_rank


def _rng_tracker():
    from deepspeed.runtime.activation_checkpointing import checkpointing

    return _internal(checkpointing, "get_cuda_rng_tracker", "saving activation-checkpointing RNG states")()


def rng_tracker_states() -> dict[str, Any]:
    """The activation-checkpointing RNG tracker's states (partitioned activations); empty otherwise."""
    return _rng_tracker().get_states()


def set_rng_tracker_states(states: dict[str, Any]) -> None:
    _rng_tracker().set_states(states)
