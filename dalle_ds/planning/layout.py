"""The run a plan is for: cluster layout, batch, precision and ZeRO settings read from the DeepSpeed JSON."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from ..distributed.ds_config import DeepSpeedConfigError, prepare_ds_config, zero_stage
from ..training.errors import UsageError

__all__ = ["EngineSettings", "Layout", "PlanError", "parse_bytes"]

_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


class PlanError(UsageError):
    """A layout or setting the run could not have; the message names it."""


def parse_bytes(text: str | int | float, what: str = "--gpu-memory") -> int:
    """'80GB' (10^9), '80GiB' (2^30), '16G' (as GB) or a plain byte count."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(text).upper())
    if not m:
        raise PlanError(f"{what}={text!r}: expected a size such as 80GB, 80GiB or 85899345920")
    unit = m.group(2)
    if unit and not unit.endswith("B"):
        unit += "B"
    if unit not in _UNITS:
        raise PlanError(f"{what}={text!r}: unknown unit {m.group(2)!r}; use B, KB, MB, GB, TB or KiB ... TiB")
    return int(float(m.group(1)) * _UNITS[unit])


@dataclasses.dataclass(frozen=True)
class Layout:
    nodes: int
    gpus_per_node: int
    gpu_memory: int  # bytes
    micro_batch: int
    grad_accum: int | None = None

    def __post_init__(self):
        flags = (("nodes", "--nodes"), ("gpus_per_node", "--gpus-per-node"), ("micro_batch", "--micro-batch-size"))
        for key, flag in flags:
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise PlanError(f"{flag}={value!r}: must be a positive integer")
        if self.grad_accum is not None and (not isinstance(self.grad_accum, int) or self.grad_accum < 1):
            raise PlanError(f"--grad-accum={self.grad_accum!r}: must be a positive integer")
        if self.gpu_memory <= 0:
            raise PlanError(f"--gpu-memory={self.gpu_memory}: must be positive")

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclasses.dataclass(frozen=True)
class EngineSettings:
    """What DeepSpeed will do, read from a (prepared) DeepSpeed JSON."""

    stage: int
    precision: str  # 'fp32', 'bf16' or 'fp16'
    micro_batch: int
    grad_accum: int
    global_batch: int
    reduce_bucket: int  # elements
    allgather_bucket: int  # elements
    overlap_comm: bool
    offload_optimizer: bool
    offload_param: bool
    prefetch_bucket: int  # ZeRO-3, elements
    persistence_threshold: int  # ZeRO-3, elements
    max_live_parameters: int  # ZeRO-3, elements
    max_reuse_distance: int  # ZeRO-3, elements
    checkpointing: bool
    cpu_checkpointing: bool
    comm_hook: dict[str, Any] | None
    communication_dtype: str | None

    @property
    def param_bytes(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def torch_dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    @classmethod
    def from_ds_config(cls, raw: dict[str, Any], layout: Layout, source: str) -> EngineSettings:
        try:
            ds = prepare_ds_config(
                raw,
                world_size=layout.world,
                micro_batch_size=layout.micro_batch,
                gradient_accumulation_steps=layout.grad_accum,
                source=source,
                given_as={
                    "train_micro_batch_size_per_gpu": "--micro-batch-size",
                    "gradient_accumulation_steps": "--grad-accum",
                },
            )
        except DeepSpeedConfigError as err:
            raise PlanError(str(err)) from None
        zero = ds.get("zero_optimization", {}) or {}
        stage = zero_stage(ds)
        precision = "fp32"
        if ds.get("bf16", {}).get("enabled"):
            precision = "bf16"
        elif ds.get("fp16", {}).get("enabled"):
            precision = "fp16"
        off_opt = (zero.get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
        off_param = (zero.get("offload_param") or {}).get("device") in ("cpu", "nvme")
        if off_param and stage != 3:
            raise PlanError(f"{source}: zero_optimization.offload_param needs stage 3 (stage is {stage})")
        if off_opt and stage == 0:
            raise PlanError(f"{source}: zero_optimization.offload_optimizer needs ZeRO stage 1-3 (stage is 0)")
        ac = raw.get("activation_checkpointing")
        hook = raw.get("communication_hook")
        if hook:
            _check_hook(hook, stage, precision, source, _bf16_optimizer(ds, stage, precision, off_opt))
        return cls(
            stage=stage,
            precision=precision,
            micro_batch=ds["train_micro_batch_size_per_gpu"],
            grad_accum=ds["gradient_accumulation_steps"],
            global_batch=ds["train_batch_size"],
            reduce_bucket=int(zero.get("reduce_bucket_size", 5e8)),
            allgather_bucket=int(zero.get("allgather_bucket_size", 5e8)),
            overlap_comm=bool(zero.get("overlap_comm", stage == 3)),
            offload_optimizer=off_opt,
            offload_param=off_param,
            prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 5e7)),
            persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 1e5)),
            max_live_parameters=int(zero.get("stage3_max_live_parameters", 1e9)),
            max_reuse_distance=int(zero.get("stage3_max_reuse_distance", 1e9)),
            checkpointing=ac is not None,
            cpu_checkpointing=bool((ac or {}).get("cpu_checkpointing", False)),
            comm_hook=hook or None,
            communication_dtype=ds.get("communication_data_type"),
        )


def _bf16_optimizer(ds: dict, stage: int, precision: str, offload: bool) -> bool:
    """Whether DeepSpeed 0.19.8 wraps the optimizer in its BF16_Optimizer (no gradient buckets):
    bf16 at ZeRO-1 without offload when gradients accumulate in fp32 (``data_types.grad_accum_dtype``)."""
    accum = (ds.get("data_types") or {}).get("grad_accum_dtype")
    return stage == 1 and precision == "bf16" and not offload and accum in ("fp32", "float32", "float")


def _check_hook(hook: dict, stage: int, precision: str, source: str, bf16_optimizer: bool) -> None:
    """The communication-hook combinations the trainer refuses (beyond those ``prepare_ds_config``
    refuses), refused here before anyone rents GPUs."""
    if hook.get("type") != "powersgd":
        raise PlanError(f"{source}: communication_hook.type={hook.get('type')!r}: the planner knows 'powersgd'")
    if bf16_optimizer:
        raise PlanError(f"{source}: communication_hook with bf16 at ZeRO stage 1 and data_types.grad_accum_dtype "
                        "fp32 (DeepSpeed's BF16_Optimizer has no gradient buckets to hook) is not supported")
