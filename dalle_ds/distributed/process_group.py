"""Creating the process group: through DeepSpeed (its version checked first), with a backend that
takes both the accelerator's tensors and the CPU tensors of host-side bookkeeping.

It stands above :mod:`.collectives` (which needs no DeepSpeed) and :mod:`.ds_adapter`."""

from __future__ import annotations

import os

import torch.distributed as dist

from . import collectives, ds_adapter

__all__ = ["backend_for", "init_distributed"]


def backend_for(device_type: str, device_backend: str) -> str:
    """The default group's backend: the accelerator's own plus gloo for CPU tensors.

    ``backend_for("cuda", "nccl") == "cuda:nccl,cpu:gloo"``; on the CPU accelerator the CPU
    backend alone (``"gloo"``)."""
    if device_type == "cpu":
        return device_backend
    return f"{device_type}:{device_backend},cpu:gloo"


def init_distributed(dist_backend: str | None = None, **kwargs) -> None:
    """Create the default process group (through DeepSpeed) so that it takes CPU and device tensors.

    ``dist_backend`` (or ``DALLE_DS_DIST_BACKEND``) overrides the choice of :func:`backend_for`. A
    group without a CPU backend gets a separate gloo group for the bookkeeping
    (:func:`.collectives.host_group`).
    """
    device_type, device_backend = ds_adapter.accelerator()
    backend = dist_backend or os.environ.get("DALLE_DS_DIST_BACKEND") or backend_for(device_type, device_backend)
    ds_adapter.init_process_group(backend, **kwargs)
    if device_type != "cpu" and "LOCAL_RANK" in os.environ:  # (MPI discovery sets it during init)
        ds_adapter.set_device(int(os.environ["LOCAL_RANK"]))  # object collectives and NCCL need it set
    collectives.set_host_group(None)
    if not collectives.has_cpu_backend():
        collectives.set_host_group(dist.new_group(backend="gloo"))  # every rank, same order: right after init
