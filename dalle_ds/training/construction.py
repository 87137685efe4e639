"""Building the trainer's model where the DeepSpeed engine will hold it: on the meta device first,
then each module's weights made on the engine's device in the engine's parameter dtype.

An eager build holds the whole model in fp32 on the host before the engine casts and moves it
(48 GB per rank for the 12B model). Built this way the host holds about one module's fp32 values at
a time (:func:`dalle_ds.models.init.materialise`), with the same weights.

Why building in the engine's dtype changes nothing (DeepSpeed 0.19.8, read in its source): the
engine casts each parameter with ``p.data.to(param_dtype)`` (``engine._cast_module_mixed_precision``,
skipped for a parameter already in that dtype) and moves the module with ``module.to(device)``; the
fp32 master weights are then made from those 16-bit parameters: ZeRO 1/2 take each rank's partition
of the 16-bit flat buffer ``.to(dtype=master dtype)`` (``zero/stage_1_and_2.py``), ZeRO-0 ``bf16``
``.clone().float()`` of the bf16 partitions (``bf16_optimizer.py``) and ``fp16``
``.clone().float()`` of the fp16 groups (``fp16/fused_optimizer.py``, ``unfused_optimizer.py``).
Our fp32 -> 16-bit copy rounds like ``.to()``, so module, masters and optimizer state are those of
an fp32 build cast by the engine.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from ..distributed import ds_adapter

__all__ = ["engine_placement"]


def _enabled(ds_config: dict[str, Any], *sections: str) -> bool:
    for section in sections:
        value = ds_config.get(section)
        if isinstance(value, dict):  # DeepSpeed reads the first section present
            return bool(value.get("enabled", False))
    return False


def engine_placement(ds_config: dict[str, Any]) -> tuple[torch.device, torch.dtype]:
    """(device, parameter dtype) the DeepSpeed engine gives the model for this config: the
    accelerator's device of this rank (``LOCAL_RANK``), fp16 / bf16 when that section is enabled,
    else fp32 (also with per-resblock gradient scaling or torch autocast, whose parameters stay fp32)."""
    device_type, _ = ds_adapter.accelerator()
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cpu") if device_type == "cpu" else torch.device(device_type, local)
    if _enabled(ds_config, "fp16"):
        return device, torch.float16
    if _enabled(ds_config, "bf16", "bfloat16"):
        return device, torch.bfloat16
    return device, torch.float32
