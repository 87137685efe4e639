#!/usr/bin/env python3
"""Training throughput and peak memory per rank for each ZeRO stage, with and without activation
checkpointing, on 2 CPU processes under the deepspeed launcher. A benchmark, not a test.

    python scripts/bench_train.py [--preset dalle-small] [--steps 8] [--micro-batch-size 16]
                                  [--compile --attention-impl dense]

Each run trains the preset for a few steps on the synthetic set (random-weight dVAE of matching
grid) and reports the median tokens/s after the first two steps and the largest peak RSS of any rank.
Rows are relative to ZeRO-0 without checkpointing, run in the same invocation. With --compile each
row is trained again with compiled blocks (an empty compile cache): its tokens/s, its speed relative
to the row's eager run, and the seconds its first two steps took beyond the eager ones (the compile).
Compiled blocks need attention that traces: --attention-impl dense for presets over 128 positions.
"""

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

from dalle_ds import DiscreteVAE, load_config, save_config, save_model
from dalle_ds.bench.train import compile_seconds, matching_dvae_config, run, stage_config

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="dalle-small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--micro-batch-size", type=int, default=16)
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--compile", action="store_true", help="also train each row with compiled blocks")
    parser.add_argument("--attention-impl", help="the preset with this attention_impl (default: the preset's)")
    args = parser.parse_args(argv)
    config = load_config(args.preset)
    base_config = json.loads((ROOT / "ds_configs" / "cpu_zero2_fp32.json").read_text())
    train_script = ROOT / "scripts" / "train_dalle.py"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        dvae = save_model(DiscreteVAE(matching_dvae_config(config)), tmp / "dvae")
        preset = args.preset
        if args.attention_impl:
            preset = tmp / "model.yaml"
            save_config(dataclasses.replace(config, attention_impl=args.attention_impl), preset)
        impl = args.attention_impl or config.attention_impl
        print(f"{args.preset} (attention_impl {impl}), micro batch {args.micro_batch_size} x 2 ranks, ", end="")
        print(f"{args.steps} steps, fp32 CPU")
        header = f"{'ZeRO':>4} {'act. ckpt':>9} {'tokens/s':>9} {'peak RSS MiB':>13} {'speed vs base':>14} "
        header += f"{'memory vs base':>15}"
        if args.compile:
            header += f" {'compiled tokens/s':>18} {'compiled vs eager':>18} {'compile s':>10}"
        print(header)
        step_tokens = 2 * args.micro_batch_size * (config.text_len + config.image_len)
        base = None
        for stage in map(int, args.stages.split(",")):
            for ckpt in (False, True):
                name = f"z{stage}{'c' if ckpt else ''}"
                cfg = stage_config(base_config, stage, ckpt)
                common = (cfg, train_script, preset, dvae, args.steps, args.micro_batch_size)
                tok, mem, start = run(tmp, name, *common)
                base = base or (tok, mem)
                row = f"{stage:>4} {'on' if ckpt else 'off':>9} {tok:9.0f} {mem:13.0f} {tok / base[0]:14.2f} "
                row += f"{mem / base[1]:15.2f}"
                if args.compile:
                    ctok, _, cstart = run(tmp, f"{name}_compiled", *common, compile=True)
                    row += f" {ctok:18.0f} {ctok / tok:18.2f} {compile_seconds(step_tokens, start, cstart):10.1f}"
                print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
