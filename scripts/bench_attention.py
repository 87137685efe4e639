#!/usr/bin/env python3
"""Benchmark one attention op (forward + backward) at the paper's sequence length.

    python scripts/bench_attention.py [--rounds 15] [--threads 1]

For each layer kind (row, column, conv) it times, interleaved in one process:
  block   - dalle_ds's block-sparse path (what training uses)
  dense   - SDPA with the full boolean mask (the reference)
  causal  - SDPA with is_causal=True (computes every causal pair, ~3x what the masks need)
and prints per-round time ratios (median and quartiles) plus the peak extra resident memory of
one forward + backward, each measured in a fresh subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter

import torch
import torch.nn.functional as F

from dalle_ds import layer_schedule
from dalle_ds.models.attention import block_attention, dense_attention


def make_fn(impl: str, kind: str, args):
    if impl == "block":
        rows = args.conv_block_rows if kind == "conv" else args.block_rows
        return lambda q, k, v: block_attention(
            q, k, v, kind, args.text_len, args.grid, args.conv_kernel, rows, args.conv_cols
        )
    if impl == "dense":
        return lambda q, k, v: dense_attention(q, k, v, kind, args.text_len, args.grid, args.conv_kernel)
    if impl == "causal":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    raise ValueError(impl)


def inputs(args):
    """q, k, v laid out as SparseAttention's projection makes them: (B, n, 3, H, d) in memory."""
    n = args.text_len + args.grid**2
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(args.batch, n, 3, args.heads, args.head_dim, generator=g).requires_grad_()
    grad = torch.randn(args.batch, n, args.heads, args.head_dim, generator=g).transpose(1, 2)
    return qkv, grad


def step(fn, qkv, grad):
    qkv.grad = None
    fn(*qkv.permute(2, 0, 3, 1, 4)).backward(grad)


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def measure_memory(args) -> None:
    """Child process: peak extra RSS of one forward + backward, printed as JSON."""
    fn = make_fn(args.memory_of, args.kind, args)
    # Warm up on a small problem first so code pages and kernels loaded on first use are not counted.
    small = argparse.Namespace(**{**vars(args), "grid": 4, "text_len": 4})
    step(make_fn(args.memory_of, args.kind, small), *inputs(small))
    qkv, grad = inputs(args)
    base = rss_bytes()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak-RSS counter (VmHWM)
        f.write("5")
    step(fn, qkv, grad)
    print(json.dumps({"peak_extra": max(0, vm_hwm_bytes() - base)}))


def child_memory(impl: str, kind: str, args) -> float:
    cmd = [
        sys.executable,
        __file__,
        "--memory-of",
        impl,
        "--kind",
        kind,
        "--threads",
        str(args.threads),
        "--text-len",
        str(args.text_len),
        "--grid",
        str(args.grid),
        "--heads",
        str(args.heads),
        "--head-dim",
        str(args.head_dim),
        "--batch",
        str(args.batch),
        "--block-rows",
        str(args.block_rows),
        "--conv-cols",
        str(args.conv_cols),
        "--conv-block-rows",
        str(args.conv_block_rows),
        "--conv-kernel",
        str(args.conv_kernel),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra"] / 2**20


def quartiles(xs):
    q = statistics.quantiles(xs, n=4)
    return q[0], statistics.median(xs), q[2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text-len", type=int, default=256)
    parser.add_argument("--grid", type=int, default=32)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--block-rows", type=int, default=2)
    parser.add_argument("--conv-block-rows", type=int, default=4)
    parser.add_argument("--conv-cols", type=int, default=0, help="conv tile width (0 = full rows)")
    parser.add_argument("--conv-kernel", type=int, default=11)
    parser.add_argument("--kinds", default="row,column,conv")
    parser.add_argument("--kind", default="row", help=argparse.SUPPRESS)
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_of:
        measure_memory(args)
        return 0

    impls = ["block", "dense", "causal"]
    n = args.text_len + args.grid**2
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); B={args.batch} H={args.heads} d={args.head_dim} "
        f"text {args.text_len} + image {args.grid}x{args.grid} = {n}; block_rows {args.block_rows}; fp32 CPU"
    )
    qkv, grad = inputs(args)
    header = (
        f"{'kind':<7} {'block ms':>9} {'dense ms':>9} {'causal ms':>9}  {'dense/block (q1 med q3)':>24}  "
        f"{'causal/block (q1 med q3)':>25}  {'peak MiB block/dense/causal':>28}"
    )
    print(header)
    medians = {}
    for kind in args.kinds.split(","):
        fns = {impl: make_fn(impl, kind, args) for impl in impls}
        for impl in impls:  # warm-up (and mask caches)
            step(fns[impl], qkv, grad)
        times = {impl: [] for impl in impls}
        for r in range(args.rounds):
            order = impls[r % 3 :] + impls[: r % 3]  # rotate who goes first
            for impl in order:
                t0 = time.perf_counter()
                step(fns[impl], qkv, grad)
                times[impl].append(time.perf_counter() - t0)
        vs_dense = quartiles([d / b for d, b in zip(times["dense"], times["block"], strict=True)])
        vs_causal = quartiles([c / b for c, b in zip(times["causal"], times["block"], strict=True)])
        med = medians[kind] = {impl: 1000 * statistics.median(ts) for impl, ts in times.items()}
        mem = "-" if args.no_memory else "/".join(f"{child_memory(i, kind, args):.0f}" for i in impls)
        print(
            f"{kind:<7} {med['block']:9.1f} {med['dense']:9.1f} {med['causal']:9.1f}  "
            f"{vs_dense[0]:7.2f} {vs_dense[1]:7.2f} {vs_dense[2]:7.2f}   "
            f"{vs_causal[0]:7.2f} {vs_causal[1]:7.2f} {vs_causal[2]:7.2f}   {mem:>28}"
        )
    if set(medians) == {"row", "column", "conv"}:
        # What a whole model sees: the paper's 64-layer schedule is 47 row, 16 column, 1 conv.
        counts = Counter(layer_schedule(64))
        total = {impl: sum(counts[k] * medians[k][impl] for k in counts) for impl in impls}
        print(
            f"64-layer schedule ({dict(counts)}): dense/block {total['dense'] / total['block']:.2f}, "
            f"causal/block {total['causal'] / total['block']:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
