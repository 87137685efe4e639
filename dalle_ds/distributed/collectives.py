"""Process groups and every collective dalle-ds issues itself (DeepSpeed's own are DeepSpeed's).

Two kinds of traffic, two rules:

- **Device tensors** (gradients for the communication hook, the dVAE codebook statistics) live on
  the engine's device and go to the default group or a subgroup of it: NCCL on CUDA.
- **Host-side bookkeeping** (the data stream's end-of-epoch flag, peak memory, checkpoint and
  sync checks, Python objects, barriers) is CPU tensors on :func:`host_group`.

:func:`dalle_ds.distributed.process_group.init_distributed` creates the default group with a
per-device backend where the accelerator is not the CPU (``"cuda:nccl,cpu:gloo"``, as torchtitan
does), so one group serves both: CUDA tensors go through NCCL and CPU tensors through gloo. A group
that was created without a CPU backend (by a caller that initialised torch.distributed itself) gets
a separate gloo group for the bookkeeping (:func:`set_host_group`). This module needs no DeepSpeed;
process-group creation, which does, stands above it. Nothing else in the package calls
``torch.distributed`` collectives directly:
``tests/test_distributed.py`` records every call during multi-process training runs and checks
this.
"""

from __future__ import annotations

import socket
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "TorchCollectives",
    "all_gather_object",
    "all_gather_into",
    "all_reduce",
    "barrier",
    "broadcast",
    "destroy",
    "free_port",
    "has_cpu_backend",
    "host_all_reduce",
    "host_group",
    "is_initialized",
    "new_group",
    "rank",
    "reduce_scatter",
    "set_host_group",
    "world_size",
]

_HOST_GROUP: Any = None  # None: the default group takes CPU tensors itself
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def _device_types(group) -> set[str]:
    """Device types the group's backends accept: torch reports ``"cpu:gloo,cuda:nccl"``-style pairs."""
    return {part.split(":")[0].strip() for part in dist.get_backend_config(group).split(",")}


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_initialized() else 1


def has_cpu_backend(group=None) -> bool:
    """Whether the group (default: the default group) takes CPU tensors itself."""
    return "cpu" in _device_types(group)


def set_host_group(group) -> None:
    """Make ``group`` the one for CPU tensors (None: the default group takes them)."""
    global _HOST_GROUP
    _HOST_GROUP = group


def host_group():
    """The group for CPU tensors and Python objects (None: the default group takes them)."""
    if _HOST_GROUP is None and is_initialized() and not has_cpu_backend():
        raise RuntimeError(
            f"the default process group ({dist.get_backend_config()}) has no CPU backend and "
            f"dalle_ds.distributed.process_group.init_distributed did not create it: initialise through it, or with "
            f'a per-device backend such as "cuda:nccl,cpu:gloo"'
        )
    return _HOST_GROUP


def new_group(ranks: list[int], **kwargs):
    """``torch.distributed.new_group``: every rank must call it for every group, in the same order."""
    return dist.new_group(ranks, **kwargs)


def free_port() -> int:
    """A free TCP port on the loopback interface (for a local launcher's ``--master_port``)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- device tensors ------------------------------------------------------------------------------
def all_reduce(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """In-place all-reduce of a tensor on the engine's device (no-op without a process group)."""
    if is_initialized():
        dist.all_reduce(tensor, op=_OPS[op], group=group)
    return tensor


def broadcast(tensor: torch.Tensor, src: int = 0, group=None) -> torch.Tensor:
    if is_initialized():
        dist.broadcast(tensor, src=src, group=group)
    return tensor


# torch 2.13 renamed the single-tensor collectives; older releases have only the old names.
def reduce_scatter(output: torch.Tensor, input: torch.Tensor, group=None) -> None:
    (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(output, input, group=group)


def all_gather_into(output: torch.Tensor, input: torch.Tensor, group=None) -> None:
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(output, input, group=group)


class TorchCollectives:
    """Sum-all-reduce and broadcast-from-rank-0 over the default group, for tensors on the engine's
    device: what the dVAE's EMA codebook needs to stay identical on every data-parallel rank (model
    files never import ``torch.distributed``; the trainer hands them this)."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> None:
        all_reduce(tensor)

    def broadcast(self, tensor: torch.Tensor) -> None:
        broadcast(tensor, src=0)


# --- host-side bookkeeping -----------------------------------------------------------------------
def host_all_reduce(values: list[float] | float, op: str = "sum", dtype=torch.float64) -> list[float] | float:
    """Reduce Python numbers over all ranks through a CPU tensor on :func:`host_group`."""
    scalar = not isinstance(values, (list, tuple))
    tensor = torch.tensor([values] if scalar else list(values), dtype=dtype)
    if is_initialized():
        dist.all_reduce(tensor, op=_OPS[op], group=host_group())
    out = tensor.tolist()
    return out[0] if scalar else out


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, through :func:`host_group`."""
    if not is_initialized():
        return [obj]
    group = host_group()
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier() -> None:
    if is_initialized():
        dist.barrier(group=host_group())


def destroy() -> None:
    """Tear the process groups down (through a barrier) before the interpreter does: gloo work
    left to exit-time destructors can abort the process."""
    global _HOST_GROUP
    if is_initialized():
        barrier()
        dist.destroy_process_group()
    _HOST_GROUP = None
