"""A plan as text: what one rank holds and sends, whether it fits, the largest term."""

from __future__ import annotations

from .plan import RunPlan

__all__ = ["format_plan", "gib"]

DESCRIPTIONS = {
    "weights_16bit": "working weights (16-bit; fp32 in fp32 runs)",
    "weights_fp32": "fp32 weights (master copy the optimizer updates)",
    "gradients": "gradients (16-bit and the fp32 copy the optimizer reads)",
    "optimizer_states": "Adam moments (fp32)",
    "optimizer_temporaries": "AdamW's temporaries while it steps",
    "activations": "activations saved for backward",
    "logits_and_loss": "logits, loss and d(logits) (fp32)",
    "attention_temporaries": "attention score tiles",
    "comm_buckets": "gradient reduce buckets",
    "gathered_parameters": "ZeRO-3 parameters gathered in flight",
    "powersgd_state": "PowerSGD residuals and Q's",
    "powersgd_in_flight": "PowerSGD, one bucket in flight",
    "dvae": "frozen dVAE (fp32, encodes on the fly)",
    "cuda_context": "CUDA context, library workspaces, NCCL",
}


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def format_plan(plan: RunPlan, source: str = "") -> str:
    e, lay = plan.engine, plan.layout
    ac = "on (CPU)" if e.cpu_checkpointing else "on" if e.checkpointing else "off"
    lines = [
        f"{plan.preset}: {plan.params / 1e9:.3f}e9 parameters on {lay.nodes} node(s) x {lay.gpus_per_node} GPU(s) "
        f"= {lay.world} ranks; {source}: ZeRO-{e.stage}, {e.precision}"
        + (", optimizer offload" if e.offload_optimizer else "")
        + (", parameter offload" if e.offload_param else ""),
        f"batch: micro {e.micro_batch} x accumulation {e.grad_accum} x {lay.world} ranks = {e.global_batch}; "
        f"activation checkpointing {ac}",
        "",
        f"GPU memory per rank at its peak{'':<26}GiB",
    ]
    for name, value in plan.components.items():
        mark = " (estimate)" if name in plan.estimates else ""
        lines.append(f"  {DESCRIPTIONS.get(name, name) + mark:<58}{gib(value):>8}")
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    lines += [
        f"  {'total (states + the larger phase: backward or step)':<58}{gib(plan.total_bytes):>8}"
        f"  of {gib(lay.gpu_memory)}: {verdict}",
        f"  largest term: {plan.largest} ({gib(plan.components[plan.largest])} GiB)",
    ]
    if plan.deepspeed_estimate is not None:
        states = sum(plan.components[k] for k in ("weights_16bit", "weights_fp32", "gradients", "optimizer_states"))
        ours, theirs = gib(states), gib(plan.deepspeed_estimate)
        lines.append(f"  model states: {ours} GiB; DeepSpeed's own estimator says {theirs} GiB")
    per_node = plan.host_bytes_at_start * lay.gpus_per_node
    lines += [
        "",
        f"host memory per rank at start-up: {gib(plan.host_bytes_at_start)} GiB ({gib(per_node)} GiB per node); "
        f"after start-up: {gib(plan.host_bytes_steady)} GiB",
        f"bytes sent per optimizer step per rank: intra-node {gib(plan.intra_node_bytes_per_step)} GiB, "
        f"inter-node {gib(plan.inter_node_bytes_per_step)} GiB",
    ]
    if plan.engine.comm_hook:
        base = plan.inter_node_bytes_without_hook
        saved = 1 - plan.inter_node_bytes_per_step / base if base else 0.0
        lines.append(f"  without the PowerSGD hook: inter-node {gib(base)} GiB ({saved:.0%} less with it)")
    for c in plan.collectives:
        lines.append(f"  {c.op:<15} {c.group:<6} {c.count:>4} x {gib(c.payload):>8} GiB  {c.what}")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append(f"estimates (not confirmed by a CPU run): {', '.join(plan.estimates)}")
    return "\n".join(lines)
