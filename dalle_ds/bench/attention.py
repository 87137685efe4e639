"""One attention op (forward + backward) timed three ways at the paper's sequence length, and its
peak extra resident memory (``scripts/bench_attention.py`` prints the table):

  block   - dalle_ds's block-sparse path (what training uses)
  dense   - SDPA with the full boolean mask (the reference)
  causal  - SDPA with is_causal=True (computes every causal pair, ~3x what the masks need)

and its memory also for ``block_copy``: the block path with the text keys and values copied into
every tile and one SDPA call (``fused=False``, what devices without split-softmax kernels run, and
what the block path ran everywhere but the CPU before the split),

and, for ``attention_impl: flex``, the share of (query block, key block) tiles each kind's
BlockMask lets FlexAttention skip (:func:`flex_sparsity`).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dalle_ds import layer_schedule
from dalle_ds.models.attention import block_attention, dense_attention
from dalle_ds.models.flex import FLEX_BLOCK_SIZE, flex_block_mask

__all__ = [
    "IMPLS",
    "MEMORY_IMPLS",
    "AttentionShape",
    "flex_sparsity",
    "inputs",
    "make_fn",
    "measure_memory",
    "quartiles",
    "ratios",
    "schedule_ratios",
    "step",
    "time_kind",
]

IMPLS = ("block", "dense", "causal")
MEMORY_IMPLS = ("block", "block_copy", "dense", "causal")


@dataclass(frozen=True)
class AttentionShape:
    """The problem (the script's options of the same names): the paper's sequence by default."""

    text_len: int = 256
    grid: int = 32
    heads: int = 8
    head_dim: int = 64
    batch: int = 1
    block_rows: int = 2
    conv_block_rows: int = 4
    conv_cols: int = 0  # conv tile width (0 = full rows)
    conv_kernel: int = 11


def make_fn(impl: str, kind: str, s: AttentionShape):
    if impl in ("block", "block_copy"):
        rows = s.conv_block_rows if kind == "conv" else s.block_rows
        fused = None if impl == "block" else False
        return lambda q, k, v: block_attention(
            q, k, v, kind, s.text_len, s.grid, s.conv_kernel, rows, s.conv_cols, fused=fused
        )
    if impl == "dense":
        return lambda q, k, v: dense_attention(q, k, v, kind, s.text_len, s.grid, s.conv_kernel)
    if impl == "causal":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    raise ValueError(impl)


def inputs(s: AttentionShape):
    """q, k, v laid out as SparseAttention's projection makes them: (B, n, 3, H, d) in memory."""
    n = s.text_len + s.grid**2
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(s.batch, n, 3, s.heads, s.head_dim, generator=g).requires_grad_()
    grad = torch.randn(s.batch, n, s.heads, s.head_dim, generator=g).transpose(1, 2)
    return qkv, grad


def step(fn, qkv, grad):
    qkv.grad = None
    fn(*qkv.permute(2, 0, 3, 1, 4)).backward(grad)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure_memory(impl: str, kind: str, s: AttentionShape) -> int:
    """Peak extra RSS (bytes) of one forward + backward, in this process: run it in a fresh one
    (it resets the process's peak-RSS counter; Linux only)."""
    fn = make_fn(impl, kind, s)
    # Warm up on a small problem first so code pages and kernels loaded on first use are not counted.
    small = dataclasses.replace(s, grid=4, text_len=4)
    step(make_fn(impl, kind, small), *inputs(small))
    qkv, grad = inputs(s)
    base = _rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS counter (VmHWM)
        f.write("5")
    step(fn, qkv, grad)
    return max(0, _vm_hwm_bytes() - base)


def time_kind(kind: str, s: AttentionShape, qkv, grad, rounds: int) -> dict[str, list[float]]:
    """Seconds per forward + backward of each implementation, ``rounds`` times, interleaved (who goes
    first rotates), after one warm-up step each (which also fills the mask caches)."""
    fns = {impl: make_fn(impl, kind, s) for impl in IMPLS}
    for impl in IMPLS:
        step(fns[impl], qkv, grad)
    times = {impl: [] for impl in IMPLS}
    for r in range(rounds):
        order = IMPLS[r % 3 :] + IMPLS[: r % 3]
        for impl in order:
            t0 = time.perf_counter()
            step(fns[impl], qkv, grad)
            times[impl].append(time.perf_counter() - t0)
    return times


def flex_sparsity(kind: str, s: AttentionShape, block_size: int = FLEX_BLOCK_SIZE) -> float:
    """Percent of the (query block, key block) tiles FlexAttention skips for ``kind`` (the image in
    column-major order for ``column`` layers, as :mod:`dalle_ds.models.flex` runs it)."""
    return flex_block_mask(kind, s.text_len, s.grid, s.conv_kernel, "cpu", block_size).sparsity()


def quartiles(xs):
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def ratios(times: dict[str, list[float]]) -> dict:
    """Per-round dense/block and causal/block time ratios (q1, median, q3) and median ms per implementation."""
    return {
        "dense_vs_block": quartiles([d / b for d, b in zip(times["dense"], times["block"], strict=True)]),
        "causal_vs_block": quartiles([c / b for c, b in zip(times["causal"], times["block"], strict=True)]),
        "median_ms": {impl: 1000 * statistics.median(ts) for impl, ts in times.items()},
    }


def schedule_ratios(medians: dict[str, dict[str, float]], n_layers: int = 64) -> tuple[dict, dict[str, float]]:
    """What a whole model sees: each kind's median time weighted by its layers in the ``n_layers``
    schedule (the paper's 64: 47 row, 16 column, 1 conv). Returns (layer counts, dense/block and
    causal/block of the weighted totals)."""
    counts = Counter(layer_schedule(n_layers))
    total = {impl: sum(counts[k] * medians[k][impl] for k in counts) for impl in IMPLS}
    return dict(counts), {"dense": total["dense"] / total["block"], "causal": total["causal"] / total["block"]}
