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
import sys
import tempfile
from pathlib import Path

import torch

from dalle_ds import DiscreteVAE, load_config, save_model
from dalle_ds.bench.train import matching_dvae_config, run, stage_config

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="dalle-small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--stages", default="0,1,2,3")
    args = parser.parse_args(argv)
    config = load_config(args.preset)
    base_config = json.loads((ROOT / "ds_configs" / "cpu_zero2_fp32.json").read_text())
    train_script = ROOT / "scripts" / "train_dalle.py"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        dvae = save_model(DiscreteVAE(matching_dvae_config(config)), tmp / "dvae")
        print(f"{args.preset}, micro batch {args.micro_batch_size} x 2 ranks, {args.steps} steps, fp32 CPU")
        print(
            f"{'ZeRO':>4} {'act. ckpt':>9} {'tokens/s':>9} {'peak RSS MiB':>13} {'speed vs base':>14} "
            f"{'memory vs base':>15}"
        )
        base = None
        for stage in map(int, args.stages.split(",")):
            for ckpt in (False, True):
                name = f"z{stage}{'c' if ckpt else ''}"
                cfg = stage_config(base_config, stage, ckpt)
                tok, mem = run(tmp, name, cfg, train_script, args.preset, dvae, args.steps, args.micro_batch_size)
                base = base or (tok, mem)
                print(
                    f"{stage:>4} {'on' if ckpt else 'off':>9} {tok:9.0f} {mem:13.0f} {tok / base[0]:14.2f} "
                    f"{mem / base[1]:15.2f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
