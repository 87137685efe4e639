"""The PowerSGD hook's share of a plan: its memory (residuals, Q's, one bucket in flight) and the
collectives it issues in place of DeepSpeed's gradient reduction, from the hook's own rules."""

from __future__ import annotations

import math

import torch

from ..distributed.powersgd import PowerSGD, PowerSGDConfig
from .layout import EngineSettings, Layout
from .traffic import Collective

__all__ = ["compressed_matrices", "powersgd_collectives", "powersgd_memory"]

_WIRE = {"fp32": 4, "fp16": 2, "bf16": 2}


def _error_bytes(psgd: PowerSGDConfig, e: EngineSettings) -> int:
    """Bytes per residual entry: ``error_dtype``; "auto" is bf16 under bf16/fp16, fp32 under fp32."""
    dtype = psgd.error_dtype
    if dtype == "auto":
        dtype = "fp32" if e.precision == "fp32" else "bf16"
    return _WIRE[dtype]


def _hierarchical(psgd: PowerSGDConfig, layout: Layout) -> bool:
    return psgd.hierarchical and layout.nodes > 1


def compressed_matrices(shape, psgd: PowerSGDConfig, layout: Layout) -> tuple[list[tuple[int, int, int]], int]:
    """((n, m, r) of every matrix this rank compresses, elements it reduces exactly). Hierarchical
    mode compresses each local rank's row shard of every gradient (``tensor_split`` over the node)."""
    hook = PowerSGD(psgd)
    local = layout.gpus_per_node if _hierarchical(psgd, layout) else 1
    matrices, plain = [], 0
    for p in shape.params:  # shards differ by at most one row; local rank 0 holds the largest
        rows = p.shape[0] if len(p.shape) >= 2 else p.numel
        part_rows = -(-rows // local)
        if len(p.shape) >= 2:
            part = (part_rows, math.prod(p.shape[1:]))
        else:
            part = (part_rows,)
        g = torch.empty(part, device="meta")
        if hook._compressible(g):
            n, m = part[0], part[1]
            matrices.append((n, m, hook._rank(n, m)))
        else:
            plain += g.numel()
    return matrices, plain


def powersgd_memory(shape, e: EngineSettings, psgd: PowerSGDConfig, layout: Layout) -> dict[str, int]:
    """Bytes per rank: ``powersgd_state`` (error-feedback residuals in their dtype and the fp32 Q's,
    kept across steps: exactly what the hook holds after a step) and ``powersgd_in_flight`` (one
    bucket's reduction at its peak: the larger of the plain part's fp32 buffer and the compressed
    part's fp32 P and Q with their 16-bit wire copies and starting Q's plus, one matrix at a time, M
    and the approximation in fp32; under fp16 the step's staged residuals; in hierarchical mode the
    node's send/gather buffer, this rank's shard and the gathered copy of the largest tensor). P, Q
    and staged residuals are counted for every compressed matrix: an upper bound where a bucket
    holds some of them."""
    if psgd.exact or psgd.hierarchical and layout.nodes == 1:
        return {"powersgd_state": 0, "powersgd_in_flight": 0}
    matrices, plain = compressed_matrices(shape, psgd, layout)
    residuals = sum(n * m for n, m, _ in matrices) * _error_bytes(psgd, e) if psgd.error_feedback else 0
    qs = sum(m * r for _, m, r in matrices) * 4
    bucket = min(e.reduce_bucket, shape.numel) if e.stage in (1, 2) else shape.numel
    largest = max((n * m for n, m, _ in matrices), default=0)
    p, q = sum(n * r for n, _, r in matrices), sum(m * r for _, m, r in matrices)
    pq = (p + q) * 4 + max(p, q) * _WIRE[psgd.dtype] * (psgd.dtype != "fp32") + q * 4
    in_flight = max(2 * 4 * largest + pq, 4 * min(bucket, plain))  # the hook reduces one part, then the other
    if e.precision == "fp16":  # the engine may skip the step: residuals staged until it is known
        in_flight += residuals
    if _hierarchical(psgd, layout):
        shard = -(-bucket // layout.gpus_per_node)
        in_flight += 4 * layout.gpus_per_node * shard + 4 * shard + 4 * max(x.numel for x in shape.params)
    return {"powersgd_state": residuals + qs, "powersgd_in_flight": in_flight}


def powersgd_collectives(shape, e: EngineSettings, psgd: PowerSGDConfig, layout: Layout) -> list[Collective]:
    """Per optimizer step: the exact all-reduce of what is not compressed (fp32), the P and Q
    all-reduces in the wire dtype, and in hierarchical mode the node's reduce-scatter and all-gather.
    ZeRO-2 reduces every micro batch; ZeRO 0 and 1 once per step."""
    calls = e.grad_accum if e.stage == 2 else 1
    P = shape.numel
    if psgd.hierarchical and layout.nodes == 1 or psgd.exact:  # the hook's one-node fallback; exact mode
        return [Collective("all_reduce", "world", P * 4, calls, "exact all-reduce (PowerSGD hook)")]
    matrices, plain = compressed_matrices(shape, psgd, layout)
    wire = _WIRE[psgd.dtype]
    group = "inter" if _hierarchical(psgd, layout) else "world"
    out = [
        Collective("all_reduce", group, plain * 4, calls, "uncompressed gradients (PowerSGD hook)"),
        Collective("all_reduce", group, sum(n * r for n, _, r in matrices) * wire, calls, "PowerSGD P"),
        Collective("all_reduce", group, sum(m * r for _, m, r in matrices) * wire, calls, "PowerSGD Q"),
    ]
    if _hierarchical(psgd, layout):
        out += [
            Collective("reduce_scatter", "intra", P * 4, calls, "node reduce-scatter (PowerSGD hook)"),
            Collective("all_gather", "intra", P * 4, calls, "node all-gather (PowerSGD hook)"),
        ]
    return out
