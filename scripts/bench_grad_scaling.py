#!/usr/bin/env python3
"""fp16 gradient fidelity of a deep, narrow DALL-E: one dynamic loss scale vs per-resblock scales.

    python scripts/bench_grad_scaling.py [--layers 48] [--d-model 64] [--steps 60] [--measure-every 10]
        [--init-std 0.02] [--loss-mult 1] [--ds-scale-power 16] [--quick] [--sweep]

1. Training. The same model (same initial weights, same batches, torch AdamW) is trained three ways in
one process, each through an in-process DeepSpeed engine at ZeRO stage 0, world size 1 (a 1-rank gloo group):

  fp32       DeepSpeed fp32: the baseline the losses and times are compared with
  ds-fp16    DeepSpeed fp16 with its dynamic loss scale: the module is cast to fp16 (parameters,
             residual stream, LayerNorms, embeddings; logits fp32 as the model computes them), fp32
             master weights in DeepSpeed's fp16 optimizer, one scale for the whole network. The backward
             goes through ``ds_adapter.backward``, which applies the loss scale DeepSpeed 0.19 forgets at ZeRO-0
  resblock   fp32 parameters in a DeepSpeed fp32 engine plus ``dalle_ds.training.grad_scaling``: every
             transformer block runs under fp16 autocast, every res block (the attention and the MLP branch
             of each layer) has its own scale; an update is skipped through ``skipping_step`` on the
             engine's inner optimizer

Every ``--measure-every`` steps, for ds-fp16 and resblock, the run's current weights are copied into a
plain fp32 model, which backpropagates the run's batch; per res block (``blocks.i.attn``: ln_1 + attention,
``blocks.i.mlp``: ln_2 + MLP; ``rest``: embeddings and ln_f) the run's parameter gradients, unscaled
(ds-fp16: divided by the engine's current loss scale), are compared with that reference:

  cos       cosine similarity to the reference (non-finite entries counted as zero)
  flush     share of the entries the reference has nonzero that are exactly zero in the run (underflow)
  mass      the reference's norm over those flushed entries / its whole norm: what the flushed entries carried
  overflow  share of non-finite entries (resblock: seen before the scaler zeroes them, by a probe hook)

2. Scale scan (``--scan``, on by default). At the fp32 run's final weights and last batch, one backward per
static scale 2^k, in both precision schemes: "all-fp16" (the model cast to fp16, as DeepSpeed's fp16 engine
runs it; reference at the fp16-rounded weights) and "amp" (the per-resblock machinery with EVERY branch scale
set to 2^k). A scale is usable when every block has cos >= 0.999 and nothing overflowed. The per-block usable
ranges of amp show whether the blocks need different scales: when their intersection is empty no single scale
serves them all, which is the case per-resblock scaling exists for.

``--loss-mult m`` multiplies the loss before backward in every run (and the reference): it stands in for the
1/(batch x positions) of a larger batch or a longer sequence, or a small loss weight; AdamW's eps is
multiplied by m so that the updates, and so the fp32 loss curve, do not change. ``--init-std`` sets the model's
``init_std``. ``--sweep`` runs a small grid of such settings and prints one summary table.

On a CPU without native fp16, DeepSpeed refuses fp16 in one capability check; this script patches it
(``ds_adapter.allow_fp16_on_cpu``, as the tests do; the arithmetic runs). The logic lives in
``dalle_ds/bench/grad_scaling/``. fp16 matmuls are about 8x slower than fp32 on
CPUs without native fp16, hence the small default. Only run on the CPU so far.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys

import torch

from dalle_ds.bench.grad_scaling import FP16_METHODS, QUICK, GradScalingSettings, bench, sweep
from dalle_ds.bench.grad_scaling.fidelity import GOAL_COS, segment_order
from dalle_ds.bench.grad_scaling.runs import scale_text
from dalle_ds.bench.grad_scaling.tables import (
    block_table,
    loss_curve_table,
    pct,
    scan_lines,
    scan_table,
    summary_table,
    sweep_table,
)
from dalle_ds.distributed import ds_adapter
from dalle_ds.distributed.single_process import init_single_process_group


def print_report(out: dict, args, log) -> None:
    results, rows = out["results"], out["rows"]
    if args.scan_only:
        losses = results["fp32"].losses
        log(f"\nfp32 loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
        log("\n## Scale scan at the fp32 run's final weights (one backward per static scale)\n")
        for line in [*scan_table(out["scan"]), "", *scan_lines(out["scan_summary"])]:
            log(line)
        return
    log("\n## Per res block (worst over the measured steps whose update was applied; overflow: all measured)\n")
    for line in block_table(results, segment_order(out["config"]), args.all_blocks):
        log(line)
    log("\n## Loss curves (mean over each window of steps)\n")
    for line in loss_curve_table(results, args.measure_every):
        log(line)
    ds = results["ds-fp16"]
    skipped_at = [i for i, s in enumerate(ds.skipped) if s]
    log(
        f"\nds-fp16: loss scale {scale_text(ds.scales[0])} at the start, {scale_text(ds.scales[-1])} at the end; "
        f"skipped steps {len(skipped_at)}{f' at {skipped_at[:20]}' if skipped_at else ''}"
    )
    st = results["resblock"].scales[-1]
    log(
        f"resblock: scales min 2^{math.log2(st['grad_scale_min']):.3f} median "
        f"2^{math.log2(st['grad_scale_median']):.3f} max 2^{math.log2(st['grad_scale_max']):.3f}; "
        f"skipped updates {st['grad_scale_skipped']} of {st['grad_scale_updates']}"
    )
    if "scan" in out:
        log("\n## Scale scan at the fp32 run's final weights (one backward per static scale)\n")
        for line in scan_table(out["scan"]):
            log(line)
        log("")
        for line in scan_lines(out["scan_summary"]):
            log(line)
    log("\n## Summary (paste into README)\n")
    for line in summary_table(rows):
        log(line)
    for m in FP16_METHODS:
        r = rows[m]
        met = r["min_block_cos"] >= GOAL_COS and r["max_block_flush_mass"] < 1e-3
        log(
            f"goal (every block cos >= {GOAL_COS}, flushed mass < 1e-3) for {m}: {'met' if met else 'NOT met'} "
            f"(min cos {r['min_block_cos']:.6f} in {r['worst_cos_block']}, max flush {pct(r['max_block_flush'])} "
            f"of entries carrying {r['max_block_flush_mass']:.1e} of the norm)"
        )


def parse_args(argv=None):
    d = GradScalingSettings()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--d-model", type=int, default=d.d_model)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument(
        "--image-grid", type=int, default=d.image_grid, help="image tokens per side (dalle-tiny: 8, seq 16 + 64)"
    )
    p.add_argument("--init-std", type=float, default=d.init_std, help="DalleConfig.init_std")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--measure-every", type=int, default=d.measure_every)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--loss-mult", type=float, default=d.loss_mult, help="multiply the loss before backward (all runs)")
    p.add_argument("--ds-scale-power", type=int, default=d.ds_scale_power, help="DeepSpeed fp16 initial_scale_power")
    p.add_argument("--ds-window", type=int, default=d.ds_window, help="DeepSpeed fp16 loss_scale_window")
    p.add_argument("--ds-hysteresis", type=int, default=d.ds_hysteresis, help="DeepSpeed fp16 hysteresis")
    p.add_argument(
        "--resblock-scale-power", type=float, default=d.resblock_scale_power, help="per-resblock initial_scale_power"
    )
    p.add_argument("--no-scan", dest="scan", action="store_false", help="skip the static scale scan")
    p.add_argument("--scan-only", action="store_true", help="train the fp32 run only, then scan (cheap)")
    p.add_argument("--scan-powers", help="A:B:S: scan 2^A .. 2^(B-1) in steps of S (default: around 1/loss-mult)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared machine)")
    p.add_argument("--all-blocks", action="store_true", help="every res block in the table")
    p.add_argument("--quick", action="store_true", help="toy size: 6 layers, d_model 32, batch 2, 6 steps")
    p.add_argument("--sweep", action="store_true", help="run the settings in SWEEP and print one summary table")
    p.add_argument("--json", help="write the summary rows (and the scan summary) here")
    args = p.parse_args(argv)
    if args.quick:
        vars(args).update({**QUICK, "scan_powers": args.scan_powers or QUICK["scan_powers"]})
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    settings = GradScalingSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(GradScalingSettings)})
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    init_single_process_group()
    with ds_adapter.allow_fp16_on_cpu() as patched:
        log(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, {torch.get_num_threads()} thread(s)")
        if patched:
            log(
                "NOTE: DeepSpeed's CPU accelerator reports fp16 as unsupported; this script patches that one check "
                "(CPU_Accelerator.is_fp16_supported -> True), as tests/launch_env/sitecustomize.py does under "
                "DALLE_DS_TEST_FP16_ON_CPU=1. The fp16 arithmetic itself runs on the CPU."
            )
        if args.sweep:
            table = sweep(settings, log)
            log("\n## Sweep summary (paste into README)\n")
            for line in sweep_table(table):
                log(line)
            payload = dict(table)
        else:
            out = bench(settings, log)
            print_report(out, args, log)
            payload = {"rows": out["rows"], "scan": out.get("scan_summary")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
