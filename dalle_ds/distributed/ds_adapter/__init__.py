"""The one place that touches DeepSpeed: engine construction and every use of its internals.

dalle-ds drives DeepSpeed through its public API (``deepspeed.initialize``, ``engine.backward`` /
``step``, ``save_checkpoint`` / ``load_checkpoint``, ``deepspeed.zero``, ``deepspeed.checkpointing``,
``deepspeed.utils.set_z3_leaf_module``)
and, where that API has no door, through a few internals, all of them in this package:

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
- ``ds_to_universal``'s ``main`` and the engine's ``load_universal_checkpoint`` setting, to resume
  on another number of ranks (:mod:`.universal`);
- the activation-checkpointing RNG tracker, saved with every rank's RNG state;
- the optimizers an engine steps (``basic_optimizer``, ZeRO-3's ``backup_optimizer``), whose ``step``
  per-resblock gradient scaling turns into a no-op to skip an update (:func:`inner_optimizers`).

:func:`check_version` runs when the process group is created: outside the supported range it stops
with the range, and an internal that moved raises :class:`DeepSpeedInternalsError` naming it. Upgrading
DeepSpeed means reading this package, nothing else.
"""

from __future__ import annotations

from .checkpoint_files import (
    MODEL_STATES,
    mapped_fp32_partitions,
    mapped_model_states,
    model_states_path,
    rng_tracker_states,
    set_rng_tracker_states,
    zero3_gather,
)
from .engine import (
    accelerator,
    apply_activation_checkpointing,
    build_engine,
    cpu_adam,
    gathered,
    init_process_group,
    register_external_parameter,
    set_device,
    zero3_init,
    zero3_leaf,
)
from .estimators import estimate_model_states
from .fp16_cpu import allow_fp16_on_cpu, force_fp16_on_cpu
from .step import (
    after_skipped_step,
    attach_comm_hook,
    backward,
    inner_optimizers,
    loss_scale,
    skipped_steps,
    write_monitor,
)
from .universal import convert_to_universal, load_universal
from .versions import SUPPORTED_DEEPSPEED, DeepSpeedInternalsError, DeepSpeedVersionError, check_version

__all__ = [
    "MODEL_STATES",
    "accelerator",
    "register_external_parameter",
    "set_device",
    "SUPPORTED_DEEPSPEED",
    "DeepSpeedInternalsError",
    "DeepSpeedVersionError",
    "after_skipped_step",
    "allow_fp16_on_cpu",
    "apply_activation_checkpointing",
    "attach_comm_hook",
    "backward",
    "build_engine",
    "check_version",
    "convert_to_universal",
    "cpu_adam",
    "estimate_model_states",
    "force_fp16_on_cpu",
    "gathered",
    "init_process_group",
    "inner_optimizers",
    "load_universal",
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
    "zero3_leaf",
]
