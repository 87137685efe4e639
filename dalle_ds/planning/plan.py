"""The dry run: per-rank GPU memory by component, host memory at start-up and bytes sent per step.

:func:`plan_run` takes a DALL-E config, a DeepSpeed JSON and a :class:`Layout` (nodes, GPUs per
node, GPU memory, micro batch, accumulation) and returns a :class:`RunPlan`. Nothing is allocated:
the model is built on the meta device (:mod:`.model_shape`), activations are what autograd saves in
a meta forward, and model states, buckets and collectives follow what DeepSpeed 0.19.8 allocates and
issues for the stage and precision. The peak is the persistent states plus the larger of two phases
that never overlap: forward and backward, and the optimizer step.

tests/test_plan_validation.py compares each term with real runs on 2 and 4 CPU ranks (states,
buckets, activations and collective bytes exactly; gradients within a parameter's gradient; the
total within 20% of the peak memory growth). Terms a CPU run cannot confirm (GPU kernels' temporaries,
ZeRO-3's parameters in flight, the CUDA context) are marked as estimates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..distributed.powersgd import PowerSGDConfig
from ..models.attention import resolve_attention_impl
from ..models.config import DalleConfig, DVAEConfig
from .layout import EngineSettings, Layout, PlanError
from .model_shape import dvae_param_count, model_shape, trace_activations
from .powersgd_plan import powersgd_collectives, powersgd_memory
from .traffic import Collective, bytes_sent

__all__ = ["CUDA_CONTEXT_BYTES", "HOST_BASE_BYTES", "Partitions", "RunPlan", "partitions", "plan_run"]

CUDA_CONTEXT_BYTES = 1 << 30  # estimate: CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers per GPU
HOST_BASE_BYTES = 3 << 30  # estimate: a rank's Python, torch and CUDA libraries in host memory
ESTIMATES = ("attention_temporaries", "gathered_parameters", "cuda_context")
GPU_ESTIMATES = ("optimizer_temporaries",)  # measured on the CPU path; the GPU's foreach path read in torch
BACKWARD_PHASE = (
    "activations", "logits_and_loss", "attention_temporaries", "gathered_parameters", "powersgd_in_flight"
)  # fmt: skip


@dataclasses.dataclass
class RunPlan:
    preset: str
    layout: Layout
    engine: EngineSettings
    params: int
    components: dict[str, int]  # name -> peak bytes per rank
    total_bytes: int  # peak per rank (persistent states + the larger of the two phases: backward, step)
    phases: dict[str, int]  # transient bytes of each phase, and the gradients' share of each
    host_bytes_at_start: int  # per rank
    host_bytes_steady: int  # per rank, after start-up (offloaded states, checkpointed activations on CPU)
    collectives: list[Collective]
    intra_node_bytes_per_step: int
    inter_node_bytes_per_step: int
    inter_node_bytes_without_hook: int | None
    estimates: tuple[str, ...]
    notes: list[str]
    deepspeed_estimate: int | None  # DeepSpeed's own estimate of model states per GPU (ZeRO 2/3)

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.layout.gpu_memory

    @property
    def largest(self) -> str:
        return max(self.components, key=self.components.get)

    def to_dict(self) -> dict[str, Any]:
        return {
            "preset": self.preset,
            "fits": self.fits,
            "total_bytes": self.total_bytes,
            "gpu_memory": self.layout.gpu_memory,
            "largest": self.largest,
            "components": dict(self.components),
            "phases": dict(self.phases),
            "estimates": list(self.estimates),
            "host_bytes_at_start": self.host_bytes_at_start,
            "host_bytes_steady": self.host_bytes_steady,
            "intra_node_bytes_per_step": self.intra_node_bytes_per_step,
            "inter_node_bytes_per_step": self.inter_node_bytes_per_step,
            "inter_node_bytes_without_hook": self.inter_node_bytes_without_hook,
            "params": self.params,
            "world": self.layout.world,
            "nodes": self.layout.nodes,
            "gpus_per_node": self.layout.gpus_per_node,
            "zero_stage": self.engine.stage,
            "precision": self.engine.precision,
            "micro_batch": self.engine.micro_batch,
            "grad_accum": self.engine.grad_accum,
            "global_batch": self.engine.global_batch,
            "activation_checkpointing": self.engine.checkpointing,
            "deepspeed_model_states_estimate": self.deepspeed_estimate,
            "collectives": [dataclasses.asdict(c) for c in self.collectives],
            "notes": list(self.notes),
        }


ALIGNMENT = 2  # DeepSpeed's nccl_start_alignment_factor: ZeRO 1/2 pad each flat group to a multiple of 2 x ranks


@dataclasses.dataclass(frozen=True)
class Partitions:
    """How DeepSpeed 0.19.8 lays the parameters out over ``W`` ranks (elements).

    ZeRO 1/2 flatten each optimizer parameter group into one buffer padded to a multiple of
    ``2 W`` (``flatten_dense_tensors_aligned``) and give each rank an equal slice of every group.
    ZeRO-3 partitions each parameter on its own (``ceil(numel / W)`` per rank) and keeps whole on
    every rank the parameters of at most ``stage3_param_persistence_threshold`` elements."""

    padded: int  # elements of the flat groups as communicated (W x a rank's partition)
    shard: int  # a rank's partition, all groups
    group_shards: tuple[int, ...]  # a rank's partition of each group (ZeRO 1/2 step one group at a time)
    persistent: int  # ZeRO-3: elements kept whole on every rank
    persistent_padded: int  # ZeRO-3: those as all-gathered (W x their partitions)
    gathered: int = 0  # ZeRO-3: elements all-gathered per micro batch for forward (W x partitions)
    regathered: int = 0  # ZeRO-3: elements gathered again in backward (released after forward)
    resident: int = 0  # ZeRO-3: elements that stay gathered from their forward to their backward


def partitions(shape, e: EngineSettings, W: int) -> Partitions:
    if e.stage == 3:
        per_rank = [-(-p.numel // W) for p in shape.params]
        kept = [(p.numel, -(-p.numel // W)) for p in shape.params if p.numel <= e.persistence_threshold]
        shard = sum(per_rank)
        # A parameter stays gathered from its forward to its backward when the elements used in
        # between (those after it, forward and backward) are within the reuse distance or the
        # prefetch window (a prefetched later use keeps it: partitioned_param_coordinator.py).
        gathered = regathered = resident = 0
        after, window = shape.numel, max(e.max_reuse_distance, e.prefetch_bucket)
        for p, n in zip(shape.params, per_rank, strict=True):
            after -= p.numel
            if p.numel <= e.persistence_threshold:
                continue
            gathered += W * n
            if 2 * after >= window:  # released after forward: gathered again for backward (and a
                # checkpointed block's recomputation)
                regathered += W * n * (2 if e.checkpointing and p.module.startswith("blocks.") else 1)
            else:
                resident += p.numel
        persistent = sum(n for n, _ in kept), W * sum(k for _, k in kept)
        return Partitions(W * shard, shard, (shard,), *persistent, gathered, regathered, resident)
    align = ALIGNMENT * W if e.stage in (1, 2) else 1
    padded = [-(-n // align) * align for n in shape.group_numels]
    shards = [n // W for n in padded] if e.stage in (1, 2) else padded
    return Partitions(sum(padded), sum(shards), tuple(shards), 0, 0)


def _model_states(e: EngineSettings, part: Partitions, P: int, device_type: str) -> tuple[dict[str, int], int, int]:
    """Weights, Adam states and step temporaries one rank holds on the GPU (bytes), as DeepSpeed
    0.19.8 allocates them for the stage and precision (tests compare each with a real engine's
    tensors), and the gradients of the two phases (backward, step).

    ``weights_16bit`` is the working copy forward and backward read: 16-bit, or fp32 in an fp32 run
    (ZeRO 1/2 keep it whole beside the fp32 master partition). Backward holds the reduced partition in
    the parameters' dtype; unreduced gradients live in the reduce bucket (ZeRO-1: those beyond one
    bucket wait for the boundary). The step adds the fp32 copies the optimizer reads. ``optimizer_temporaries``:
    what torch's AdamW allocates while it steps the largest group: ``sqrt(exp_avg_sq)`` and its
    quotient on the CPU (single-tensor path), one ``_foreach_sqrt`` result on a GPU (foreach path)."""
    mixed = e.precision != "fp32"
    g = e.param_bytes
    shard = part.shard
    if e.stage == 0:
        weights16, weights32, opt = (2 * P if mixed else 0), 4 * P, 8 * P
        backward = step = (2 * P + 4 * P) if mixed else 4 * P  # 16-bit .grad + the fp32 copy the optimizer steps
    else:
        weights16, weights32, opt = g * part.padded, 4 * shard, 8 * shard
        if e.stage == 3:
            weights16 = g * (shard + part.persistent)
        # Gradients are copied into the reduce bucket (comm_buckets) as they arrive, and the reduced
        # partition is kept; ZeRO-1 reduces at the boundary only, so those beyond one bucket wait.
        backward = g * shard + (g * max(0, P - e.reduce_bucket) if e.stage == 1 else 0)
        step = g * shard + (0 if e.offload_optimizer else 4 * shard)
    temporaries = (2 if device_type == "cpu" else 1) * 4 * max(part.group_shards)
    if e.offload_optimizer:  # fp32 master, its gradients and the moments live on the host
        weights32, opt, temporaries = 0, 0, 0
    if e.offload_param:
        weights16 = 0
    states = {"weights_16bit": weights16, "weights_fp32": weights32, "gradients": max(backward, step),
              "optimizer_states": opt, "optimizer_temporaries": temporaries}  # fmt: skip
    return states, backward, step


def _buckets(e: EngineSettings, part: Partitions, P: int, largest_module: int) -> dict[str, int]:
    """Communication staging buffers. ``comm_buckets``: the gradient reduce buffer DeepSpeed allocates
    at its full ``reduce_bucket_size`` (elements, in the parameters' dtype) whatever the model's size,
    two with ZeRO 1/2's ``overlap_comm``. ``gathered_parameters`` (ZeRO-3, an estimate): the whole
    parameters held at the turn from forward to backward: those kept gathered (see
    :func:`partitions`) plus the prefetch bucket and the module in use."""
    if e.stage == 0:
        return {"comm_buckets": 0}
    buffers = 2 if e.overlap_comm and e.stage in (1, 2) else 1
    out = {"comm_buckets": e.reduce_bucket * e.param_bytes * buffers}
    if e.stage == 3:
        in_flight = part.resident + max(e.prefetch_bucket, largest_module) + largest_module
        out["gathered_parameters"] = min(P, in_flight) * e.param_bytes
    return out


def _collectives(e: EngineSettings, part: Partitions, P: int, W: int) -> list[Collective]:
    """DeepSpeed's gradient reduction and parameter gathering per optimizer step (no hook). ZeRO 1/2
    all-reduce the gradient buckets (DeepSpeed 0.19.8's ``use_multi_rank_bucket_allreduce``, also with
    ``reduce_scatter: true``): every micro batch at ZeRO-2, at the boundary at ZeRO-1; then gather the
    updated partitions. ZeRO-3 gathers each parameter for forward and again for backward where the
    elements used in between exceed both ``stage3_max_reuse_distance`` and the prefetch bucket (small
    models keep everything gathered), kept (persistent) ones once after the step, and reduce-scatters
    the gradients every micro batch.
    Scalars (the gradient norm, overflow flags: under 16 bytes a step) are left out."""
    if W == 1:
        return []
    g = e.param_bytes
    A = e.grad_accum
    if e.stage == 0:
        return [Collective("all_reduce", "world", P * g, 1, "gradients at the accumulation boundary")]
    if e.stage in (1, 2):
        return [
            Collective("all_reduce", "world", P * g, A if e.stage == 2 else 1, "gradient buckets"),
            Collective("all_gather", "world", part.padded * g, 1, "updated 16-bit partitions"),
        ]
    out = [
        Collective("all_gather", "world", part.gathered * g, A, "parameters, forward (kept for backward)"),
        Collective("reduce_scatter", "world", part.padded * g, A, "gradients"),
    ]
    if part.regathered:
        out.append(Collective("all_gather", "world", part.regathered * g, A, "parameters gathered again for backward"))
    if part.persistent:
        out.append(Collective("all_gather", "world", part.persistent_padded * g, 1, "updated persistent parameters"))
    return out


def plan_run(
    config: DalleConfig,
    ds_config: dict[str, Any],
    layout: Layout,
    *,
    preset: str = "",
    dvae: DVAEConfig | None = None,
    source: str = "DeepSpeed config",
    device_type: str = "cuda",
) -> RunPlan:
    """The plan of one run (see the module doc). ``dvae``: the frozen tokenizer that encodes images
    on the fly (None: codes precomputed by scripts/encode_images.py)."""
    if not isinstance(config, DalleConfig):
        raise PlanError(f"--preset {preset or config}: the planner plans DALL-E runs; got a {type(config).__name__}")
    e = EngineSettings.from_ds_config(ds_config, layout, source)
    W = layout.world
    shape = model_shape(config)
    P = shape.numel
    notes: list[str] = []
    part = partitions(shape, e, W)
    try:  # the attention path training takes on this device, and whether it can run backward there
        resolve_attention_impl(config.attention_impl, device_type, config.text_len + config.image_len)
    except RuntimeError as err:
        raise PlanError(str(err)) from None
    comps, grads_backward, grads_step = _model_states(e, part, P, device_type)
    trace = trace_activations(config, e.micro_batch, e.torch_dtype, device_type)
    if e.checkpointing:
        saved = trace.checkpointed_blocks(inputs_on_host=e.cpu_checkpointing)
    else:
        saved = trace.embeddings + sum(trace.blocks)
    comps["activations"] = saved
    comps["logits_and_loss"] = trace.head + trace.logits  # saved by the head, plus d(logits) at backward's start
    comps["attention_temporaries"] = _attention_temporaries(config, e, trace.attention_impl)
    comps.update(_buckets(e, part, P, shape.largest_module_numel))
    collectives = _collectives(e, part, P, W)
    without_hook = None
    if e.comm_hook:
        psgd = PowerSGDConfig.from_section(e.comm_hook)
        hook_memory, hook_collectives, hook_notes = _powersgd(shape, e, psgd, layout)
        comps.update(hook_memory)
        notes += hook_notes
        without_hook = bytes_sent(collectives, layout.nodes, layout.gpus_per_node)[1]
        collectives = [c for c in collectives if c.what != "gradient buckets" and "at the accumulation" not in c.what]
        collectives += hook_collectives
    comps["dvae"] = dvae_param_count(dvae) * 4 if dvae is not None else 0
    comps["cuda_context"] = CUDA_CONTEXT_BYTES if device_type != "cpu" else 0
    if part.regathered:
        notes.append("ZeRO-3 gathers a parameter again for backward when its next use lies beyond "
                     "stage3_max_reuse_distance and the prefetch bucket (read in DeepSpeed's coordinator); "
                     "a CPU run of a 25M model with 1e6-element windows gathered less (1.2 x its parameters "
                     "per step, not the plan's 2 x): that traffic and gathered_parameters are estimates")  # fmt: skip
    # Two phases never overlap: forward and backward (activations, unreduced gradients, buckets in
    # flight) and the optimizer step (fp32 gradients, the optimizer's temporaries).
    backward_phase = grads_backward + sum(comps.get(k, 0) for k in BACKWARD_PHASE)
    step_phase = grads_step + comps["optimizer_temporaries"]
    persistent = sum(v for k, v in comps.items() if k not in (*BACKWARD_PHASE, "gradients", "optimizer_temporaries"))
    total = persistent + max(backward_phase, step_phase)
    intra, inter = bytes_sent(collectives, layout.nodes, layout.gpus_per_node)
    if without_hook is None:
        without_hook = inter
    host_start = HOST_BASE_BYTES + _host_construction(shape, dvae)
    host_steady = HOST_BASE_BYTES + (16 * -(-P // W) if e.offload_optimizer else 0)
    if e.checkpointing and e.cpu_checkpointing:
        host_steady += sum(trace.block_inputs)
    if e.offload_param:
        host_steady += 2 * -(-P // W)
    ds_estimate = _deepspeed_estimate(e, P, shape.largest_module_numel, layout)
    return RunPlan(
        preset=preset,
        layout=layout,
        engine=e,
        params=P,
        components=comps,
        total_bytes=int(total),
        phases={"backward": backward_phase, "step": step_phase, "gradients_backward": grads_backward,
                "gradients_step": grads_step},  # fmt: skip
        host_bytes_at_start=int(host_start),
        host_bytes_steady=int(host_steady),
        collectives=collectives,
        intra_node_bytes_per_step=intra,
        inter_node_bytes_per_step=inter,
        inter_node_bytes_without_hook=without_hook,
        estimates=tuple(k for k in ESTIMATES if k in comps) + (() if device_type == "cpu" else GPU_ESTIMATES),
        notes=notes,
        deepspeed_estimate=ds_estimate,
    )


def _attention_temporaries(config: DalleConfig, e: EngineSettings, impl: str) -> int:
    """Estimate: the score tiles one attention call holds (fp32 scores and probabilities). Block
    attention computes one tile of query rows at a time against the text and the keys its mask
    reaches; dense attention the whole n x n matrix (fused GPU kernels hold far less). FlexAttention
    keeps its tiles on chip and writes no scores to memory: counted is what its backward adds, one
    fp32 value per query and head (its saved tensors are in the activation trace)."""
    B, H = e.micro_batch, config.n_heads
    n = config.text_len + config.image_len
    if "dense" in impl:
        return B * H * n * n * 4 * 2 + n * n
    if impl == "flex":
        return B * H * n * 4
    g = config.image_grid
    q_tile = max(config.block_rows, config.conv_block_rows) * g
    k_tile = config.text_len + (config.conv_block_rows + config.conv_kernel // 2) * g
    return B * H * q_tile * max(k_tile, config.text_len + g * config.block_rows * 2) * 4 * 2


def _host_construction(shape, dvae: DVAEConfig | None) -> int:
    """Host bytes the model's construction needs per rank: ZeRO 0-2 build on the meta device and
    materialise one module at a time, ZeRO-3 builds partitioned and initialises one gathered module at
    a time; either way each module's values are drawn in fp32 on the host first. The frozen dVAE is
    loaded on the host in fp32 before it moves to the device."""
    build = 4 * shape.largest_module_numel
    return build + (dvae_param_count(dvae) * 4 if dvae is not None else 0)


def _deepspeed_estimate(e: EngineSettings, P: int, largest: int, layout: Layout) -> int | None:
    from ..distributed import ds_adapter

    return ds_adapter.estimate_model_states(
        e.stage, P, largest, layout.gpus_per_node, layout.nodes, e.offload_optimizer, e.offload_param
    )


def _powersgd(shape, e: EngineSettings, psgd: PowerSGDConfig, layout: Layout):
    """The PowerSGD hook's memory components, its collectives (replacing the engine's gradient
    reduction) and notes: hierarchical mode on one node falls back to an exact all-reduce."""
    notes = []
    if psgd.hierarchical and layout.nodes == 1:
        notes.append("hierarchical PowerSGD on one node: every cross-node group has one rank, exact all-reduce")
    return powersgd_memory(shape, e, psgd, layout), powersgd_collectives(shape, e, psgd, layout), notes
