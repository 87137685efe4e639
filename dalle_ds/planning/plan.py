"""The dry run: per-rank GPU memory by component, host memory at start-up and bytes sent per step.

:func:`plan_run` takes a DALL-E config, a DeepSpeed JSON and a :class:`Layout` (nodes, GPUs per
node, GPU memory, micro batch, accumulation) and returns a :class:`RunPlan`. Nothing is allocated:
the model is built on the meta device (:mod:`.model_shape`), activations are what autograd saves in
a meta forward, and model states, buckets and collectives follow what DeepSpeed 0.19.8 allocates and
issues for the stage and precision (tests check each against a real run). Terms the CPU cannot
confirm (GPU kernels' temporaries, the CUDA context) are marked as estimates.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..distributed.powersgd import PowerSGDConfig
from ..models.config import DalleConfig, DVAEConfig
from .layout import EngineSettings, Layout, PlanError
from .model_shape import dvae_param_count, model_shape, trace_activations
from .powersgd_plan import powersgd_collectives, powersgd_memory
from .traffic import Collective, bytes_sent

__all__ = ["CUDA_CONTEXT_BYTES", "HOST_BASE_BYTES", "RunPlan", "plan_run"]

CUDA_CONTEXT_BYTES = 1 << 30  # estimate: CUDA context, cuBLAS/cuDNN workspaces, NCCL buffers per GPU
HOST_BASE_BYTES = 3 << 30  # estimate: a rank's Python, torch and CUDA libraries in host memory
ESTIMATES = ("attention_temporaries", "cuda_context")


@dataclasses.dataclass
class RunPlan:
    preset: str
    layout: Layout
    engine: EngineSettings
    params: int
    components: dict[str, int]  # name -> peak bytes per rank
    total_bytes: int  # peak per rank (persistent states + the larger of the two transient phases)
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


def _model_states(e: EngineSettings, P: int, W: int) -> dict[str, int]:
    """Weights, gradients and Adam states one rank holds on the GPU (bytes), as DeepSpeed 0.19.8
    allocates them for the stage and precision (exact for the flat buffers, padding aside)."""
    mixed = e.precision != "fp32"
    shard = -(-P // W)  # a rank's partition (ZeRO pads partitions to equal sizes)
    full16 = 2 * P if mixed else 0
    if e.stage == 0:
        weights16, weights32 = full16, 4 * P
        grads = (2 * P + 4 * P) if mixed else 4 * P  # 16-bit .grad + the fp32 copy the optimizer steps
        opt = 8 * P
    elif e.stage in (1, 2):
        weights16, weights32 = full16, 4 * shard
        if e.stage == 1:  # full-size .grad until the accumulation boundary, then the fp32 partition
            grads = (2 * P if mixed else 4 * P) + (4 * shard if mixed else 0)
        else:  # the reduced gradients of this rank's partition (16-bit) and their fp32 copy
            grads = (2 * shard + 4 * shard) if mixed else 4 * shard
        opt = 8 * shard
    else:
        weights16 = 2 * shard if mixed else 0
        weights32 = 4 * shard
        grads = (2 * shard + 4 * shard) if mixed else 4 * shard
        opt = 8 * shard
    if e.offload_optimizer:  # fp32 master, its gradients and the moments live on the host
        weights32, opt = 0, 0
        grads = 2 * shard if mixed and e.stage > 1 else grads - 4 * shard if e.stage == 1 and mixed else grads
    if e.offload_param:
        weights16 = 0
    return {"weights_16bit": weights16, "weights_fp32": weights32, "gradients": grads, "optimizer_states": opt}


def _buckets(e: EngineSettings, P: int, largest_module: int) -> int:
    """Communication staging buffers: ZeRO 1/2's reduce buckets (two with overlap_comm), ZeRO-3's
    gathered parameters in flight (prefetch bucket, at least the largest module) and reduce bucket."""
    if e.stage == 0:
        return 0
    grad_bytes = 2 if e.precision != "fp32" else 4
    if e.stage in (1, 2):
        n = min(e.reduce_bucket, P)
        return n * grad_bytes * (2 if e.overlap_comm else 1)
    gathered = min(P, max(e.prefetch_bucket, largest_module) + largest_module) * e.param_bytes
    return gathered + min(e.reduce_bucket, P) * grad_bytes


def _collectives(e: EngineSettings, P: int, W: int) -> list[Collective]:
    """DeepSpeed's gradient reduction and parameter gathering per optimizer step (no hook)."""
    if W == 1:
        return []
    g = 4 if e.precision == "fp32" else 2
    A = e.grad_accum
    if e.stage == 0:
        return [Collective("all_reduce", "world", P * g, 1, "gradients at the accumulation boundary")]
    if e.stage in (1, 2):
        calls = A if e.stage == 2 else 1
        op = "reduce_scatter" if e.reduce_scatter else "all_reduce"
        return [
            Collective(op, "world", P * g, calls, "gradient buckets"),
            Collective("all_gather", "world", P * e.param_bytes, 1, "updated 16-bit partitions"),
        ]
    return [
        Collective("all_gather", "world", P * e.param_bytes, 2 * A, "parameters, forward and backward"),
        Collective("reduce_scatter", "world", P * g, A, "gradients"),
    ]


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
    comps = _model_states(e, P, W)
    trace = trace_activations(config, e.micro_batch, e.torch_dtype, device_type)
    if e.checkpointing:
        saved = trace.embeddings + (0 if e.cpu_checkpointing else sum(trace.block_inputs)) + max(trace.blocks)
    else:
        saved = trace.embeddings + sum(trace.blocks)
    comps["activations"] = saved
    comps["logits_and_loss"] = trace.head + trace.logits  # saved by the head, plus d(logits) at backward's start
    comps["attention_temporaries"] = _attention_temporaries(config, e, trace.attention_impl)
    comps["comm_buckets"] = _buckets(e, P, shape.largest_module_numel)
    collectives = _collectives(e, P, W)
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
    comps["cuda_context"] = CUDA_CONTEXT_BYTES
    transient = ("activations", "logits_and_loss", "attention_temporaries", "powersgd_in_flight")
    persistent = sum(v for k, v in comps.items() if k not in transient)
    total = persistent + sum(comps.get(k, 0) for k in transient)
    intra, inter = bytes_sent(collectives, layout.nodes, layout.gpus_per_node)
    if without_hook is None:
        without_hook = inter
    host_start = HOST_BASE_BYTES + _host_construction(e, shape, dvae)
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
        host_bytes_at_start=int(host_start),
        host_bytes_steady=int(host_steady),
        collectives=collectives,
        intra_node_bytes_per_step=intra,
        inter_node_bytes_per_step=inter,
        inter_node_bytes_without_hook=without_hook,
        estimates=ESTIMATES,
        notes=notes,
        deepspeed_estimate=ds_estimate,
    )


def _attention_temporaries(config: DalleConfig, e: EngineSettings, impl: str) -> int:
    """Estimate: the score tiles one attention call holds (fp32 scores and probabilities). Block
    attention computes one tile of query rows at a time against the text and the keys its mask
    reaches; dense attention the whole n x n matrix (fused GPU kernels hold far less)."""
    B, H = e.micro_batch, config.n_heads
    n = config.text_len + config.image_len
    if "dense" in impl:
        return B * H * n * n * 4 * 2 + n * n
    g = config.image_grid
    q_tile = max(config.block_rows, config.conv_block_rows) * g
    k_tile = config.text_len + (config.conv_block_rows + config.conv_kernel // 2) * g
    return B * H * q_tile * max(k_tile, config.text_len + g * config.block_rows * 2) * 4 * 2


def _host_construction(e: EngineSettings, shape, dvae: DVAEConfig | None) -> int:
    """Host bytes the model's construction needs per rank: ZeRO 0-2 build on the meta device and
    materialise one module at a time (its fp32 weights on the host); ZeRO-3 builds partitioned on the
    device. The frozen dVAE is loaded on the host in fp32 before it moves to the device."""
    build = 0 if e.stage == 3 else 4 * shape.largest_module_numel
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
