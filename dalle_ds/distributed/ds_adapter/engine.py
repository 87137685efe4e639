"""The process group, the engine, and what wraps the model before it: ZeRO-3 construction
and leaf modules, activation checkpointing, the optimizer DeepSpeed steps."""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from typing import Any

import torch

from .versions import _internal, check_version


def init_process_group(backend: str, **kwargs) -> None:
    """``deepspeed.init_distributed(backend)`` without building DeepSpeed's CPU shared-memory op.

    On the CPU accelerator DeepSpeed 0.19 JIT-builds ``deepspeed_shm_comm`` in every process (~60 s
    on a fresh extensions cache) and under the launcher each rank leaves a 66 MiB segment in
    /dev/shm that is never unlinked. The op only serves DeepSpeed-inference; training reduces
    through torch.distributed either way.
    """
    import deepspeed

    check_version()
    # `deepspeed.comm.torch` as an attribute is the torch package; the submodule needs importlib.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    build = _internal(ds_torch_comm, "build_shm_op", "skipping the shared-memory op build")
    ds_torch_comm.build_shm_op = lambda: None
    try:
        deepspeed.init_distributed(dist_backend=backend, **kwargs)
    finally:
        ds_torch_comm.build_shm_op = build


def accelerator() -> tuple[str, str]:
    """(device type, communication backend) of DeepSpeed's accelerator, e.g. ("cuda", "nccl")."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return acc.device_name(), acc.communication_backend_name()


def set_device(local_rank: int) -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().set_device(local_rank)


MUON_MODULE = "deepspeed.runtime.zero.muon.muon_optimizer"


def _import_muon_with_lazy_compile() -> None:
    """Import DeepSpeed's Muon optimizer with its ``torch.compile`` wrappers made on first call.

    DeepSpeed 0.19.8's ZeRO code imports its Muon module while building an engine and on every
    gradient reduction (for ``isinstance`` checks); the module wraps its kernels in ``torch.compile``
    at import, and making such a wrapper imports torch._inductor (~2 s per process on a small CPU).
    torch.compile compiles at the first call anyway, so deferring the wrapper to the first call
    changes nothing for a Muon user and spares everyone else the import.
    """
    if MUON_MODULE in sys.modules:
        return
    eager = torch.compile

    def lazy(model=None, **kwargs):
        if model is None:  # used as @torch.compile(...)
            return lambda fn: lazy(fn, **kwargs)
        compiled = None

        @functools.wraps(model)
        def call(*args, **kw):
            nonlocal compiled
            if compiled is None:
                compiled = eager(model, **kwargs)
            return compiled(*args, **kw)

        return call

    torch.compile = lazy
    try:
        importlib.import_module(MUON_MODULE)
    finally:
        torch.compile = eager


def build_engine(model: torch.nn.Module, ds_config: dict[str, Any], optimizer, lr_scheduler=None):
    """``deepspeed.initialize`` with a prepared config and the trainer's optimizer and scheduler."""
    import deepspeed

    _import_muon_with_lazy_compile()
    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=lr_scheduler, config=ds_config
    )
    return engine, optimizer, lr_scheduler


def zero3_init(ds_config: dict[str, Any]):
    """Context in which modules are built already partitioned (ZeRO-3)."""
    import deepspeed

    return deepspeed.zero.Init(config_dict_or_path=ds_config)


def gathered(params, modifier_rank: int | None = None, enabled: bool = True):
    """Context with ZeRO-3 partitioned ``params`` whole on every rank (a no-op when not enabled)."""
    if not enabled:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def zero3_leaf(module: torch.nn.Module) -> None:
    """ZeRO-3 gathers ``module``'s parameters all at once, in hooks on ``module`` alone (none on its
    submodules). Call before :func:`build_engine`, which registers the hooks."""
    from deepspeed.utils import set_z3_leaf_module

    set_z3_leaf_module(module, True)


def register_external_parameter(module: torch.nn.Module, param: torch.nn.Parameter) -> None:
    """ZeRO-3: ``param`` is used in ``module``'s forward though it belongs to a submodule."""
    import deepspeed

    deepspeed.zero.register_external_parameter(module, param)


def cpu_adam(params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
    """DeepSpeed's CPU AdamW (ZeRO offloads optimizer states to the CPU and steps them there)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    return DeepSpeedCPUAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adamw_mode=True)


def apply_activation_checkpointing(blocks: torch.nn.ModuleList, ds_config: dict[str, Any]) -> bool:
    """Recompute each residual block in backward, through ``deepspeed.checkpointing``.

    Driven by the config's ``activation_checkpointing`` section (present = on): partitioned and
    CPU checkpointing, contiguous buffers and ``number_checkpoints`` are passed to DeepSpeed as set.
    Returns whether checkpointing was applied.
    """
    ac = ds_config.get("activation_checkpointing")
    if ac is None:
        return False
    import deepspeed

    deepspeed.checkpointing.configure(
        None,
        partition_activations=bool(ac.get("partition_activations", False)),
        contiguous_checkpointing=bool(ac.get("contiguous_memory_optimization", False)),
        num_checkpoints=ac.get("number_checkpoints") or len(blocks),
        checkpoint_in_cpu=bool(ac.get("cpu_checkpointing", False)),
        synchronize=bool(ac.get("synchronize_checkpoint_boundary", False)),
        profile=bool(ac.get("profile", False)),
    )
    for block in blocks:
        if getattr(block, "_dalle_ds_checkpointed", False):
            continue
        inner = block.forward

        def forward(x, *args, _inner=inner, **kwargs):
            if torch.is_grad_enabled() and x.requires_grad and not args and not kwargs:
                return deepspeed.checkpointing.checkpoint(_inner, x)
            return _inner(x, *args, **kwargs)  # no grad (e.g. sampling with a KV cache): nothing to save

        block.forward = forward
        block._dalle_ds_checkpointed = True
    return True
