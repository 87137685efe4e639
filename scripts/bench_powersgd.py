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
import statistics
import time

import torch
import torch.distributed as dist

from dalle_ds import get_preset
from dalle_ds.distributed.powersgd import PowerSGD, PowerSGDConfig
from dalle_ds.models.dalle import Block


def median_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def row_shard(g: torch.Tensor, shards: int, index: int) -> torch.Tensor:
    rows = g.reshape(g.shape[0], -1) if g.ndim >= 2 else g.reshape(-1)
    return rows.tensor_split(shards)[index].clone()


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
    dist.init_process_group("gloo", rank=0, world_size=1)

    config = get_preset(args.preset)
    kinds = ["row", "column", "conv"]
    torch.manual_seed(0)
    blocks = torch.nn.Sequential(*(Block(config, kinds[i % 3]) for i in range(args.blocks)))
    params = [(n, p) for n, p in blocks.named_parameters()]
    x = torch.randn(args.batch, config.seq_len, config.d_model)

    def backward():
        blocks.zero_grad(set_to_none=True)
        loss = blocks(x).float().pow(2).mean()
        start = time.perf_counter()
        loss.backward()
        return (time.perf_counter() - start) * 1e3

    backward()  # warm-up
    backward_ms = statistics.median(backward() for _ in range(args.rounds))
    grads = [(n, p.grad.detach().clone()) for n, p in params]
    n_params = sum(g.numel() for _, g in grads)
    print(
        f"{args.preset}: {args.blocks} block(s), {n_params / 1e6:.1f}M parameters, "
        f"{args.batch} x {config.seq_len} positions; backward {backward_ms:.0f} ms "
        f"({torch.get_num_threads()} threads)"
    )

    settings = []
    shards = args.gpus_per_node
    shard_rank = args.total_rank // shards
    settings.append(
        (f"paper: {shards} shards x r={shard_rank}", [(n, row_shard(g, shards, 0)) for n, g in grads], shard_rank)
    )
    for r in (int(v) for v in args.flat_ranks.split(",") if v):
        settings.append((f"flat r={r}", grads, r))

    print()
    print("| setting | sent MB/GPU | plain 16-bit MB | plain fp32 MB | vs 16-bit | vs fp32 ", end="")
    print("| compress ms | / backward |")
    print("|---|---|---|---|---|---|---|---|")
    for name, tensors, rank in settings:
        hook = PowerSGD(
            PowerSGDConfig(
                rank=rank, start_iter=0, min_compression_rate=2, dtype="fp16", orthogonalization="householder"
            )
        )
        work = [(n, g.clone()) for n, g in tensors]
        hook.reduce(work)  # first call draws and orthogonalises Q: not the steady state
        sent, full32 = (b / 1e6 for b in hook.last_step_bytes)  # plain: the same tensors in fp32
        full16 = full32 / 2

        def step(hook=hook, tensors=tensors):
            hook.reduce([(n, g.clone()) for n, g in tensors])

        ms = median_ms(step, args.rounds)
        print(
            f"| {name} | {sent:.2f} | {full16:.1f} | {full32:.1f} | {1 - sent / full16:.1%} less | "
            f"{1 - sent / full32:.1%} less | {ms:.0f} | {ms / backward_ms:.2f} |"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
