#!/usr/bin/env python3
"""Training throughput and peak memory per rank for each ZeRO stage, with and without activation
checkpointing, on 2 CPU processes under the deepspeed launcher. A benchmark, not a test.

    python scripts/bench_train.py [--preset dalle-small] [--steps 8] [--micro-batch-size 16]

Each run trains the preset for a few steps on the synthetic set (random-weight dVAE of matching
grid) and reports the median tokens/s after the first two steps and the largest peak RSS of any rank.
Rows are relative to ZeRO-0 without checkpointing, run in the same invocation.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from dalle_ds import DiscreteVAE, DVAEConfig, load_config, save_model
from dalle_ds.distributed.collectives import free_port

ROOT = Path(__file__).resolve().parents[1]


def run(tmp: Path, name: str, stage: int, ckpt: bool, args, dvae: Path) -> tuple[float, float]:
    cfg = json.loads((ROOT / "ds_configs" / "cpu_zero2_fp32.json").read_text())
    cfg["zero_optimization"] = {"stage": stage}
    cfg.pop("csv_monitor", None)
    if ckpt:
        cfg["activation_checkpointing"] = {"partition_activations": False}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    out = tmp / name
    launcher = Path(sys.executable).with_name("deepspeed")
    cmd = [
        sys.executable,
        str(launcher),
        "--num_gpus",
        "2",
        "--master_port",
        str(free_port()),
        str(ROOT / "scripts" / "train_dalle.py"),
        "--deepspeed_config",
        str(path),
        "--preset",
        args.preset,
        "--dvae",
        str(dvae),
        "--output-dir",
        str(out),
        "--steps",
        str(args.steps),
        "--micro-batch-size",
        str(args.micro_batch_size),
        "--no-progress",
        "--bpe-dropout",
        "0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows[2:]), max(r["peak_rss_mb"] for r in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="dalle-small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--stages", default="0,1,2,3")
    args = parser.parse_args(argv)
    config = load_config(args.preset)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        vcfg = DVAEConfig(
            image_size=config.image_grid * 4,
            codebook_size=config.image_vocab_size,
            n_hid=16,
            n_init=16,
            n_blk_per_group=1,
            group_count=3,
        )
        torch.manual_seed(0)
        dvae = save_model(DiscreteVAE(vcfg), tmp / "dvae")
        print(f"{args.preset}, micro batch {args.micro_batch_size} x 2 ranks, {args.steps} steps, fp32 CPU")
        print(
            f"{'ZeRO':>4} {'act. ckpt':>9} {'tokens/s':>9} {'peak RSS MiB':>13} {'speed vs base':>14} "
            f"{'memory vs base':>15}"
        )
        base = None
        for stage in map(int, args.stages.split(",")):
            for ckpt in (False, True):
                tok, mem = run(tmp, f"z{stage}{'c' if ckpt else ''}", stage, ckpt, args, dvae)
                base = base or (tok, mem)
                print(
                    f"{stage:>4} {'on' if ckpt else 'off':>9} {tok:9.0f} {mem:13.0f} {tok / base[0]:14.2f} "
                    f"{mem / base[1]:15.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
