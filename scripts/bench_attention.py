#!/usr/bin/env python3
"""Benchmark one attention op (forward + backward) at the paper's sequence length.

    python scripts/bench_attention.py [--rounds 15] [--threads 1]
    python scripts/bench_attention.py --sparsity [--flex-block-size 128]

For each layer kind (row, column, conv) it times, interleaved in one process:
  block   - dalle_ds's block-sparse path (what training uses)
  dense   - SDPA with the full boolean mask (the reference)
  causal  - SDPA with is_causal=True (computes every causal pair, ~3x what the masks need)
and prints per-round time ratios (median and quartiles) plus the peak extra resident memory of
one forward + backward, each measured in a fresh subprocess: block, block with the text keys copied
into every tile (``copy``: one SDPA call, the path without split-softmax kernels), dense, causal.
``--sparsity`` instead prints the share of tiles each kind's FlexAttention BlockMask skips (``attention_impl: flex``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys

import torch

from dalle_ds.bench.attention import (
    MEMORY_IMPLS,
    AttentionShape,
    flex_sparsity,
    inputs,
    measure_memory,
    ratios,
    schedule_ratios,
    time_kind,
)
from dalle_ds.models.flex import FLEX_BLOCK_SIZE


def child_memory(impl: str, kind: str, shape: AttentionShape, threads: int) -> float:
    """MiB: ``measure_memory`` in a fresh process (this script with the hidden ``--memory-of``)."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in dataclasses.asdict(shape).items()]
    cmd = [sys.executable, __file__, "--memory-of", impl, "--kind", kind, "--threads", str(threads), *flags]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra"] / 2**20


def main(argv=None) -> int:
    d = AttentionShape()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--text-len", type=int, default=d.text_len)
    parser.add_argument("--grid", type=int, default=d.grid)
    parser.add_argument("--heads", type=int, default=d.heads)
    parser.add_argument("--head-dim", type=int, default=d.head_dim)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--block-rows", type=int, default=d.block_rows)
    parser.add_argument("--conv-block-rows", type=int, default=d.conv_block_rows)
    parser.add_argument("--conv-cols", type=int, default=d.conv_cols, help="conv tile width (0 = full rows)")
    parser.add_argument("--conv-kernel", type=int, default=d.conv_kernel)
    parser.add_argument("--kinds", default="row,column,conv")
    parser.add_argument("--kind", default="row", help=argparse.SUPPRESS)
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--sparsity", action="store_true", help="print the flex BlockMasks' skipped tiles, no timing")
    parser.add_argument("--flex-block-size", type=int, default=FLEX_BLOCK_SIZE)
    args = parser.parse_args(argv)
    shape = AttentionShape(**{f.name: getattr(args, f.name) for f in dataclasses.fields(AttentionShape)})
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"peak_extra": measure_memory(args.memory_of, args.kind, shape)}))
        return 0

    n = args.text_len + args.grid**2
    if args.sparsity:
        b = args.flex_block_size
        print(f"text {args.text_len} + image {args.grid}x{args.grid} = {n}; flex blocks of {b}: {-(-n // b)}^2 tiles")
        for kind in args.kinds.split(","):
            print(f"{kind:<7} {flex_sparsity(kind, shape, b):5.1f}% of tiles skipped")
        return 0
    print(
        f"torch {torch.__version__}, {args.threads} thread(s); B={args.batch} H={args.heads} d={args.head_dim} "
        f"text {args.text_len} + image {args.grid}x{args.grid} = {n}; block_rows {args.block_rows}; fp32 CPU"
    )
    qkv, grad = inputs(shape)
    header = (
        f"{'kind':<7} {'block ms':>9} {'dense ms':>9} {'causal ms':>9}  {'dense/block (q1 med q3)':>24}  "
        f"{'causal/block (q1 med q3)':>25}  {'peak MiB block/copy/dense/causal':>33}"
    )
    print(header)
    medians = {}
    for kind in args.kinds.split(","):
        r = ratios(time_kind(kind, shape, qkv, grad, args.rounds))
        vs_dense, vs_causal, med = r["dense_vs_block"], r["causal_vs_block"], r["median_ms"]
        medians[kind] = med
        mem = "-"
        if not args.no_memory:
            mem = "/".join(f"{child_memory(i, kind, shape, args.threads):.0f}" for i in MEMORY_IMPLS)
        print(
            f"{kind:<7} {med['block']:9.1f} {med['dense']:9.1f} {med['causal']:9.1f}  "
            f"{vs_dense[0]:7.2f} {vs_dense[1]:7.2f} {vs_dense[2]:7.2f}   "
            f"{vs_causal[0]:7.2f} {vs_causal[1]:7.2f} {vs_causal[2]:7.2f}   {mem:>33}"
        )
    if set(medians) == {"row", "column", "conv"}:
        counts, total = schedule_ratios(medians)
        print(f"64-layer schedule ({counts}): dense/block {total['dense']:.2f}, causal/block {total['causal']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
