#!/usr/bin/env python3
"""PowerSGD benchmarks: bytes and compression time at the paper's shapes, memory, convergence.

    python scripts/bench_powersgd.py [--blocks 1] [--batch 1] [--gpus-per-node 8] [--rounds 3]
    python scripts/bench_powersgd.py --mode memory [--d-model 768] [--layers 8] [--steps 3] [--repeats 3] [--bucket 5e6]
    python scripts/bench_powersgd.py --mode convergence [--seeds 0,1,2] [--steps 40]

bytes (default): builds `--blocks` residual blocks of the `dalle-12b` preset (d_model 3968, 62
heads, text 256 + 32x32 image: 1280 positions), times forward + backward of one micro-batch, and
runs the hook on the resulting gradients in one process (collectives over a 1-rank gloo group: what
is timed is the compression math; bytes come from the hook's own counters, per GPU). Settings:

  paper      hierarchical: this GPU's 1/G row shard of every tensor (after the in-node
             reduce-scatter), rank 896/G per shard, P and Q in fp16, Householder
  flat r=R   no sharding, every matrix at rank R, fp16 wire

Bytes are this GPU's payload into cross-node collectives, against an uncompressed all-reduce of
the same tensors (the shard, in the paper's layout) in 16 bits (the paper's mixed-precision
gradients) and in fp32.

memory: the DALL-E trainer (dalle-small's shapes at `--d-model` / `--layers`) on 2 CPU ranks, bf16,
ZeRO-2 with `--bucket`-element buckets (5e6), without the hook and with flat PowerSGD (rank 4 from
step 0) keeping fp32 and bf16 residuals: the largest peak RSS of any rank (median of `--repeats` runs, with glibc's
mmap threshold fixed so that RSS follows live tensors), and its growth per compressed parameter.

convergence: dalle-tiny on 2 CPU ranks (fp32, ZeRO-2), rank-4 PowerSGD from step 10 with fp32 and
with bf16 residuals, per seed: the mean loss of the last 5 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from dalle_ds import DiscreteVAE, get_preset, load_config, save_config, save_model
from dalle_ds.bench.powersgd import (
    block_grads,
    final_loss,
    measure_setting,
    memory_runs,
    param_counts,
    settings,
    train_rows,
)
from dalle_ds.bench.train import matching_dvae_config
from dalle_ds.distributed.powersgd import PowerSGDConfig

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "scripts" / "train_dalle.py"


def bytes_mode(args) -> None:
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


def dvae_for(config, tmp: Path) -> Path:
    torch.manual_seed(0)
    return save_model(DiscreteVAE(matching_dvae_config(config)), tmp / "dvae")


def memory_mode(args) -> None:
    config = load_config("dalle-small", d_model=args.d_model, n_layers=args.layers, n_heads=args.d_model // 64)
    hook = {"type": "powersgd", "rank": 4, "start_iter": 0, "min_compression_rate": 2}
    hooks = {"off": None, **{f"PowerSGD, {d} residuals": {**hook, "error_dtype": d} for d in ("fp32", "bf16")}}
    params, compressed = param_counts(config, PowerSGDConfig.from_section(hook))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_config(config, tmp / "model.yaml")
        dvae = dvae_for(config, tmp)
        run = (args.steps, args.mbs, args.repeats, int(args.bucket))
        peaks = memory_runs(tmp, TRAIN, tmp / "model.yaml", dvae, hooks, *run)
    print(f"d_model {args.d_model}, {args.layers} layers: {params / 1e6:.1f}M parameters, {compressed / 1e6:.1f}M")
    print(f"compressed; bf16, ZeRO-2, {args.bucket:.0e}-element buckets, 2 ranks, micro batch {args.mbs}, ", end="")
    print(f"{args.steps} steps;")
    print(f"peak RSS: the largest of any rank, median of {args.repeats} runs, malloc's mmap threshold at 1 MiB")
    print()
    print("| setting | peak RSS MiB | vs off MiB | bytes / compressed parameter |")
    print("|---|---|---|---|")
    for name, peak in peaks.items():
        extra = peak - peaks["off"]
        print(f"| {name} | {peak:.0f} | {extra:+.0f} | {extra * 2**20 / compressed:.2f} |")


def convergence_mode(args) -> None:
    base = json.loads((ROOT / "ds_configs" / "cpu_zero2_fp32_powersgd.json").read_text())
    base.pop("csv_monitor", None)
    hook = {**base["communication_hook"], "rank": 4, "start_iter": 10, "min_compression_rate": 1.5}
    extra = ("--data-size", 256, "--lr", 3e-3, "--warmup-steps", 1, "--no-progress")
    config = get_preset("dalle-tiny")
    print(f"dalle-tiny, 2 ranks, fp32 ZeRO-2, micro batch {args.mbs}, {args.steps} steps, rank 4 from step 10; ")
    print("mean loss of the last 5 steps")
    print()
    print("| seed | fp32 residuals | bf16 residuals | bf16 vs fp32 |")
    print("|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dvae = dvae_for(config, tmp)
        for seed in map(int, args.seeds.split(",")):
            loss = {}
            for dtype in ("fp32", "bf16"):
                cfg = {**base, "communication_hook": {**hook, "error_dtype": dtype}}
                run = ("dalle-tiny", dvae, args.steps, args.mbs, *extra, "--seed", seed)
                loss[dtype] = final_loss(train_rows(tmp, f"s{seed}_{dtype}", cfg, TRAIN, *run))
            print(f"| {seed} | {loss['fp32']:.5f} | {loss['bf16']:.5f} | {loss['bf16'] / loss['fp32'] - 1:+.3%} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("bytes", "memory", "convergence"), default="bytes")
    p.add_argument("--preset", default="dalle-12b", help="bytes: the preset whose blocks are measured")
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--batch", type=int, default=1, help="sequences per micro-batch for the backward timing")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--total-rank", type=int, default=896, help="the paper's rank summed over a node's shards")
    p.add_argument("--flat-ranks", default="4,32,112")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--d-model", type=int, default=768, help="memory: the model's width (dalle-small otherwise)")
    p.add_argument("--layers", type=int, default=8, help="memory: the model's layers")
    p.add_argument("--steps", type=int, default=None, help="training steps (memory: 3, convergence: 40)")
    p.add_argument("--mbs", type=int, default=None, help="micro batch per rank (memory: 1, convergence: 4)")
    p.add_argument("--seeds", default="0,1,2", help="convergence: the seeds")
    p.add_argument("--repeats", type=int, default=3, help="memory: runs per setting (the median is printed)")
    p.add_argument("--bucket", type=float, default=5e6, help="memory: reduce_bucket_size (elements)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = {"memory": (3, 1), "convergence": (40, 4)}.get(args.mode, (None, None))
    args.steps = args.steps or defaults[0]
    args.mbs = args.mbs or defaults[1]
    {"bytes": bytes_mode, "memory": memory_mode, "convergence": convergence_mode}[args.mode](args)


if __name__ == "__main__":
    main()
