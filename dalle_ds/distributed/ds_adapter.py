"""The one module that touches DeepSpeed: engine construction and every use of its internals.

dalle-ds drives DeepSpeed through its public API (``deepspeed.initialize``, ``engine.backward`` /
``step``, ``save_checkpoint`` / ``load_checkpoint``, ``deepspeed.zero``, ``deepspeed.checkpointing``)
and, where that API has no door, through a few internals, all of them here:

- the fp16 loss scale (``optimizer.loss_scale_config.cur_scale`` or ``optimizer.cur_scale``);
- the ZeRO-0 fp16 loss-scale fix in :func:`backward` (DeepSpeed 0.19 never scales the loss there);
- the ZeRO-3 persistent-parameter re-gather after a skipped fp16 step (:func:`after_skipped_step`);
- gradient reduction routed through a communication hook (:func:`attach_comm_hook`): ZeRO 1/2
  through the optimizer's ``gradient_reduction_w_predivide`` and its ``ipg_buckets`` /
  ``bit16_groups``; ZeRO 0 through ``engine.enable_backward_allreduce``;
- ``deepspeed.comm.torch.build_shm_op``, not built at start-up (:func:`init_process_group`);
- the Muon optimizer module, imported with its torch.compile wrappers deferred to their first call
  (:func:`build_engine`: their eager construction imports torch._inductor);
- checkpoint file names (``mp_rank_00_model_states.pt``), the layout keys in them, and
  ``zero_to_fp32``'s optimizer-file parser and ZeRO-3 gather, for the streaming export;
- the activation-checkpointing RNG tracker, saved with every rank's RNG state;
- the optimizers an engine steps (``basic_optimizer``, ZeRO-3's ``backup_optimizer``), whose ``step``
  per-resblock gradient scaling turns into a no-op to skip an update (:func:`inner_optimizers`).

:func:`check_version` runs when the process group is created: outside the supported range it stops
with the range, and an internal that moved raises :class:`DeepSpeedInternalsError` naming it. Upgrading
DeepSpeed means reading this file, nothing else.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import sys
from pathlib import Path
from typing import Any

import torch

from .errors import CommHookError

__all__ = [
    "MODEL_STATES",
    "SUPPORTED_DEEPSPEED",
    "DeepSpeedInternalsError",
    "DeepSpeedVersionError",
    "add_config_arguments",
    "after_skipped_step",
    "allow_fp16_on_cpu",
    "apply_activation_checkpointing",
    "attach_comm_hook",
    "backward",
    "build_engine",
    "check_version",
    "cpu_adam",
    "force_fp16_on_cpu",
    "gathered",
    "init_process_group",
    "inner_optimizers",
    "loss_scale",
    "mapped_fp32_partitions",
    "mapped_model_states",
    "model_states_path",
    "rng_tracker_states",
    "set_rng_tracker_states",
    "skipped_steps",
    "write_monitor",
    "zero3_gather",
    "zero3_init",
]

SUPPORTED_DEEPSPEED = (">=0.19.8", "<0.20")  # keep equal to setup.py's requirement
"""The DeepSpeed range whose internals this module was written against and tested with."""

MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, ZeRO 3


class DeepSpeedVersionError(RuntimeError):
    """The installed DeepSpeed is outside :data:`SUPPORTED_DEEPSPEED`."""


class DeepSpeedInternalsError(RuntimeError):
    """A DeepSpeed internal dalle-ds relies on is not where this module expects it."""


def _version() -> str:
    import deepspeed

    return deepspeed.__version__


def check_version(version: str | None = None) -> str:
    """Raise :class:`DeepSpeedVersionError` unless ``version`` (default: the installed one) is supported."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    version = version or _version()
    spec = SpecifierSet(",".join(SUPPORTED_DEEPSPEED))
    if Version(version).release is None or Version(version) not in spec:
        raise DeepSpeedVersionError(
            f"DeepSpeed {version} is not supported: dalle-ds needs deepspeed{spec} (it relies on internals "
            f"listed in dalle_ds/distributed/ds_adapter.py). Install a supported version, e.g. "
            f"pip install 'deepspeed{spec}'"
        )
    return version


def _internal(obj: Any, name: str, what: str) -> Any:
    """``getattr(obj, name)``, or an error that names the missing internal and what needs it."""
    if not hasattr(obj, name):
        owner = obj.__name__ if isinstance(obj, type) or hasattr(obj, "__path__") else type(obj).__name__
        raise DeepSpeedInternalsError(
            f"DeepSpeed {_version()}: {owner}.{name} is missing; dalle-ds uses it for {what}. This "
            f"DeepSpeed moved an internal (supported: deepspeed{','.join(SUPPORTED_DEEPSPEED)})"
        )
    return getattr(obj, name)


# --- process group and engine ----------------------------------------------------------------


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


def add_config_arguments(parser):
    """DeepSpeed's launcher arguments (``--deepspeed_config``, ``--deepspeed``)."""
    import deepspeed

    return deepspeed.add_config_arguments(parser)


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


# --- the training step -------------------------------------------------------------------------


def loss_scale(engine) -> float | None:
    """The optimizer's current fp16 loss scale, or None when it has none (fp32 / bf16)."""
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    config = getattr(opt, "loss_scale_config", None)
    if config is not None and getattr(config, "cur_scale", None) is not None:
        return float(config.cur_scale)
    for attr in ("loss_scale", "cur_scale"):
        value = getattr(opt, attr, None)
        if isinstance(value, (int, float, torch.Tensor)):
            return float(value)
    raise DeepSpeedInternalsError(
        f"DeepSpeed {_version()}: {type(opt).__name__} has no loss_scale_config.cur_scale, loss_scale or "
        f"cur_scale; dalle-ds reads the fp16 loss scale from one of them"
    )


def skipped_steps(engine) -> int:
    """Optimizer steps the engine skipped (fp16 overflow) since it was built."""
    return int(_internal(engine, "skipped_steps", "counting skipped fp16 steps"))


def backward(engine, loss: torch.Tensor) -> None:
    """``engine.backward(loss)``, working around DeepSpeed 0.19's ZeRO-0 fp16 bug.

    At ZeRO stage 0 with fp16 the engine never multiplies the loss by the loss scale (only ZeRO
    optimizers do) while FP16_Optimizer still divides the gradients by it: every update would be
    ~65536x too small. We apply the scale ourselves in that one case. With a communication hook at
    ZeRO-0 the engine's all-reduce is off and the hook averages the gradients here, at the
    accumulation boundary, before ``engine.step()``.
    """
    if engine.fp16_enabled() and engine.zero_optimization_stage() == 0:
        scale = loss_scale(engine)
        if scale is not None:
            loss = loss.float() * scale
    engine.backward(loss)
    hook = getattr(engine, "_dalle_ds_comm_hook", None)
    if hook is not None and engine.zero_optimization_stage() == 0 and engine.is_gradient_accumulation_boundary():
        grads = [(name, p.grad) for name, p in engine.module.named_parameters() if p.grad is not None]
        hook.reduce(grads, scale=loss_scale(engine) or 1.0)


def after_skipped_step(engine) -> None:
    """Repair what DeepSpeed 0.19.8's ZeRO-3 leaves undone when an fp16 step overflows.

    ``DeepSpeedZeroOptimizer_Stage3.step`` partitions every parameter, then returns early on an
    overflow, before ``_post_step`` gathers the persistent (small, never-sharded) parameters again.
    The next forward then fetches them outside the recorded prefetch trace, and when the trace was
    recorded while they were gathered (the first step after loading a checkpoint is an overflow)
    backward fails with "tracing error ... expected the next 1 parameters in the parameter fetch
    queue". Gathering them here restores what a completed step leaves.
    """
    if engine.zero_optimization_stage() != 3:
        return
    persistent = _internal(engine.optimizer, "persistent_parameters", "re-gathering after a skipped ZeRO-3 step")
    if persistent:
        persistent[0].all_gather(persistent)


def attach_comm_hook(engine, hook) -> None:
    """Route the engine's data-parallel gradient reduction through ``hook.reduce(named_grads, scale=)``.

    ZeRO 1/2: every gradient bucket the optimizer would all-reduce goes to the hook instead (its
    ``reduce_scatter`` must be off, so every bucket passes ``gradient_reduction_w_predivide``). ZeRO 0:
    the engine's backward all-reduce is turned off and :func:`backward` calls the hook. ZeRO 3 is
    refused: it reduce-scatters partitioned gradients, with no per-matrix view to compress. The hook's
    ``skips_non_finite`` is set when the engine skips overflowed steps (fp16).
    """
    stage = engine.zero_optimization_stage()
    if stage == 3:
        raise CommHookError(
            "communication_hook: ZeRO stage 3 is not supported (its reduce-scatter of partitioned "
            "gradients has no per-matrix view to compress); use stage 0, 1 or 2"
        )
    hook.skips_non_finite = engine.fp16_enabled()  # DeepSpeed's fp16 optimizers skip overflowed steps
    if stage == 0:
        _internal(engine, "enable_backward_allreduce", "turning the engine's all-reduce off for the hook")
        engine.enable_backward_allreduce = False
        engine._dalle_ds_comm_hook = hook
        return
    opt = engine.optimizer
    if not all(hasattr(opt, name) for name in ("gradient_reduction_w_predivide", "ipg_buckets", "bit16_groups")):
        raise CommHookError(
            f"communication_hook: the engine's optimizer {type(opt).__name__} does not reduce gradients in "
            f"buckets (DeepSpeed picks BF16_Optimizer for bf16 at ZeRO stage 1); use ZeRO stage 0 or 2"
        )
    if getattr(opt, "reduce_scatter", False):
        raise CommHookError("communication_hook with ZeRO 1/2 needs zero_optimization.reduce_scatter=false")

    def reduce_bucket(tensor: torch.Tensor, communication_data_type: torch.dtype):
        bucket = opt.ipg_buckets[communication_data_type]
        views, offset = [], 0
        for group, index, param_id in bucket.params:
            p = opt.bit16_groups[group][index]
            views.append((param_id, tensor.narrow(0, offset, p.numel()).view(p.shape)))
            offset += p.numel()
        if offset != tensor.numel():  # a parameter larger than the bucket comes alone
            param = _internal(opt, "extra_large_param_to_reduce", "mapping buckets to parameters").get(
                communication_data_type
            )
            if param is None or param.numel() != tensor.numel():
                raise DeepSpeedInternalsError("communication hook: cannot map the gradient bucket to parameters")
            views = [(id(param), tensor.view(param.shape))]
        hook.reduce(views, scale=loss_scale(engine) or 1.0)  # fp16: the buckets hold scaled gradients
        return tensor

    opt.gradient_reduction_w_predivide = reduce_bucket
    engine._dalle_ds_comm_hook = hook


def inner_optimizers(engine) -> list:
    """The optimizers that change parameters and moments when the engine steps: the client optimizer
    (``engine.basic_optimizer``, which ZeRO 1-3 wrap and call) and ZeRO-3's ``backup_optimizer``
    (partial optimizer offload). Making their ``step`` a no-op skips an update while the engine's
    own bookkeeping (gradient norm, partition copies, zero_grad) still runs."""
    found = [_internal(engine, "basic_optimizer", "skipping an update (per-resblock gradient scaling)")]
    backup = getattr(engine.optimizer, "backup_optimizer", None)
    if backup is not None:
        found.append(backup)
    return [opt for opt in found if opt is not None]


def write_monitor(engine, events: list[tuple[str, float, int]]) -> None:
    """Events to the monitors the config enables (csv_monitor, tensorboard, wandb, comet)."""
    if engine.monitor.enabled:
        engine.monitor.write_events(events)


# --- checkpoints and RNG -------------------------------------------------------------------------


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


# --- fp16 on the CPU accelerator (tests and benchmarks) ------------------------------------------


def _fp16_supported(self) -> bool:
    return True


def force_fp16_on_cpu(cpu_accelerator: type) -> None:
    """Make DeepSpeed's CPU accelerator class report fp16 as supported for the rest of the process.

    Without native fp16 (``torch.ops.mkldnn._is_mkldnn_fp16_supported``) its ``is_fp16_supported`` says
    no and DeepSpeed refuses an fp16 config, though the arithmetic runs. For processes that must not
    import DeepSpeed to patch it (tests/launch_env/sitecustomize.py calls this as the class is defined)."""
    cpu_accelerator.is_fp16_supported = _fp16_supported


@contextlib.contextmanager
def allow_fp16_on_cpu():
    """Within the block, DeepSpeed's CPU accelerator reports fp16 as supported (:func:`force_fp16_on_cpu`)
    where it would refuse it; other accelerators are left alone. Yields whether it patched."""
    from unittest import mock

    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu" or acc.is_fp16_supported():
        yield False
        return
    with mock.patch.object(type(acc), "is_fp16_supported"):  # restores the original on exit
        force_fp16_on_cpu(type(acc))
        yield True
