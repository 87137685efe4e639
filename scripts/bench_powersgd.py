#!/usr/bin/env python3
"""PowerSGD at the paper's 12B layer shapes: bytes per step and compression time vs the backward pass.

    python scripts/bench_powersgd.py [--blocks 1] [--batch 1] [--gpus-per-node 8] [--rounds 3]

Builds `--blocks` residual blocks of the `dalle-12b` preset (d_model 3968, 62 heads, text 256 +
32x32 image: 1280 positions), times forward + backward of one micro-batch, and runs the hook on
the resulting gradients in one process (collectives over a 1-rank gloo group: what is timed is
the compression math; bytes come from the hook's own counters, per GPU). Settings:

  paper      hierarchical: this GPU's 1/G row shard of every tensor (after the in-node
             reduce-scatter), rank 896/G per shard, P and Q in fp16, Householder
  flat r=R   no sharding, every matrix at rank R, fp16 wire

Bytes are this GPU's payload into cross-node collectives, against an uncompressed all-reduce of
the same tensors (the shard, in the paper's layout) in 16 bits (the paper's mixed-precision
gradients) and in fp32.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from dalle_ds import get_preset
from dalle_ds.bench.powersgd import block_grads, measure_setting, settings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="dalle-12b")
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch for the backward timing")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--total-rank", type=int, default=896, help="the paper's rank summed over a node's shards")
    p.add_argument("--flat-ranks", default="4,32,112")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("gloo", rank=0, world_size=1)  # a plain torch group: no DeepSpeed needed

    config = get_preset(args.preset)
    grads, backward_ms = block_grads(config, args.blocks, args.batch, args.rounds)
    n_params = sum(g.numel() for _, g in grads)
    print(
        f"{args.preset}: {args.blocks} block(s), {n_params / 1e6:.1f}M parameters, "
        f"{args.batch} x {config.seq_len} positions; backward {backward_ms:.0f} ms "
        f"({torch.get_num_threads()} threads)"
    )
    flat_ranks = [int(v) for v in args.flat_ranks.split(",") if v]
    print()
    print("| setting | sent MB/GPU | plain 16-bit MB | plain fp32 MB | vs 16-bit | vs fp32 ", end="")
    print("| compress ms | / backward |")
    print("|---|---|---|---|---|---|---|---|")
    for name, tensors, rank in settings(grads, args.gpus_per_node, args.total_rank, flat_ranks):
        m = measure_setting(tensors, rank, args.rounds)
        sent, full16, full32, ms = m["sent_mb"], m["plain16_mb"], m["plain32_mb"], m["ms"]
        print(
            f"| {name} | {sent:.2f} | {full16:.1f} | {full32:.1f} | {1 - sent / full16:.1%} less | "
            f"{1 - sent / full32:.1%} less | {ms:.0f} | {ms / backward_ms:.2f} |"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
