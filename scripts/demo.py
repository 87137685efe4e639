#!/usr/bin/env python3
"""End-to-end demo on a built-in default: train a tiny dVAE, then a tiny DALL-E, on captioned
shapes this script makes itself, through the `deepspeed` launcher (2 CPU ranks, or one rank per
GPU on up to 2 GPUs), and check that the model draws captions it never saw.

    ./scripts/demo.sh [--out outputs/demo] [--ranks 2] [--dvae-steps 1000] [--dalle-steps 1500]

1. Data: the synthetic captioned-shapes set ("a red circle at the top left": 4 colours x 3 shapes
   x 9 positions), drawn on the fly; ``--holdout`` combinations are kept out of both stages.
2. dVAE: 36 px -> 9 x 9 codes of 128, EMA vector quantiser (``dvae-demo``), ``--ranks``
   DeepSpeed ranks (ZeRO-2, fp32): 2 CPU processes without CUDA, else one per GPU (at most 2).
   One rank accumulates two micro batches, so micro and global batch match the 2-rank run.
3. DALL-E: ``dalle-demo`` (4 layers, d 128) on those codes, same launcher and config.
4. Samples ``--per-caption`` images for every held-out caption (temperature ``--temperature``),
   writes them as a grid PNG (one row per caption) and reads colour, shape and position back with
   the set's checker; the same at temperature 1 for comparison.

Prints the share of samples with every attribute right (chance: 1/108 for a random image that
shows a shape), the dVAE's codebook use and reconstruction PSNR, and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from dalle_ds.distributed.launcher import deepspeed_command

ROOT = Path(__file__).resolve().parent.parent


def default_ranks() -> int:
    """2 CPU ranks without CUDA; with CUDA one rank per GPU, at most 2 (a rank needs its own GPU)."""
    import torch

    return min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2


def batch_layout(batch_size: int, ranks: int) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) for a global batch over ``ranks``.

    The demo's reference run has 2 ranks; a single rank accumulates two micro batches of the same
    size, so the global batch, the micro batch and the number of optimizer steps stay the same."""
    accum = max(1, 2 // ranks)
    return batch_size // (ranks * accum), accum


def launch(script: str, ranks: int, args: list[str]) -> None:
    """Run ``scripts/<script>`` under the deepspeed launcher with ``ranks`` processes (CPU, or one per GPU)."""
    cmd = deepspeed_command(ROOT / "scripts" / script, *args, num_gpus=ranks)
    # One math thread per rank: the ranks share the machine's cores.
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // ranks)), "PYTHONUNBUFFERED": "1"}
    print("$ " + " ".join(cmd[1:]), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"demo: {script} failed (exit {proc.returncode}); see the output above")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument(
        "--ranks",
        type=int,
        default=None,
        help="DeepSpeed processes (default: 2 on the CPU; with CUDA one per GPU, at most 2)",
    )
    p.add_argument("--holdout", type=int, default=20, help="combinations kept out of training (of 108)")
    p.add_argument("--dvae-steps", type=int, default=1000)
    p.add_argument("--dalle-steps", type=int, default=1800)
    p.add_argument("--batch-size", type=int, default=64, help="global batch of both stages")
    p.add_argument("--per-caption", type=int, default=16, help="samples per held-out caption")
    p.add_argument("--top-k", type=int, default=0, help="sampling: k most likely codes (0: all)")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.5,
        help="sampling temperature (the accuracy at 1.0 is reported too): at 1.0 the tiny model's stray "
        "low-probability codes show up as specks and mixed colours",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ds-config", default=str(ROOT / "ds_configs" / "cpu_zero2_fp32.json"))
    args = p.parse_args(argv)
    if args.ranks is None:
        args.ranks = default_ranks()
    if args.ranks < 1:
        p.error("--ranks must be >= 1")
    micro, accum = batch_layout(args.batch_size, args.ranks)
    if args.batch_size % (args.ranks * accum):
        p.error(f"--batch-size {args.batch_size} is not divisible by --ranks {args.ranks} x accumulation {accum}")
    start = time.time()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    common = ["--deepspeed_config", args.ds_config, "--micro-batch-size", str(micro), "--holdout", str(args.holdout),
              "--data-size", "1000000", "--seed", str(args.seed), "--log-every", "10"]  # fmt: skip
    if accum > 1:
        common += ["--grad-accum", str(accum)]

    import torch

    from dalle_ds.data.synthetic import SyntheticShapes, caption_of, holdout_combos
    from dalle_ds.inference.evaluation import caption_accuracy, dvae_metrics
    from dalle_ds.inference.generation import load_pipeline
    from dalle_ds.utils.images import save_grid

    held = holdout_combos(args.holdout)
    preview = SyntheticShapes(32, 36, seed=args.seed, exclude=held)
    save_grid(torch.stack([preview[i]["image"] for i in range(32)]), out / "data_preview.png")
    print(f"[demo] data: 108 caption combinations, {len(held)} held out of training; preview in {out}/data_preview.png")

    timings = {}
    t = time.time()
    dvae_args = ["--preset", "dvae-demo", "--recon-loss", "mse", "--lr", "2e-3", "--steps", str(args.dvae_steps)]
    launch("train_dvae.py", args.ranks, [*common, *dvae_args, "--output-dir", str(out / "dvae")])
    timings["dvae_s"] = round(time.time() - t, 1)
    t = time.time()
    launch("train_dalle.py", args.ranks, [*common, "--preset", "dalle-demo", "--dvae", str(out / "dvae" / "final"),
                                          "--lr", "1e-3", "--steps", str(args.dalle_steps),
                                          "--output-dir", str(out / "dalle")])  # fmt: skip
    timings["dalle_s"] = round(time.time() - t, 1)

    t = time.time()
    torch.set_num_threads(os.cpu_count() or 1)
    model, tokenizer = load_pipeline(out / "dalle" / "final")
    fresh = SyntheticShapes(1024, model.dvae.config.image_size, seed=12345)  # every combination, unseen images
    images = torch.stack([fresh[i]["image"] for i in range(len(fresh))])
    tok = dvae_metrics(model.dvae, images.split(128))

    sampling = {"per_caption": args.per_caption, "seed": args.seed, "top_k": args.top_k}
    acc, samples, _ = caption_accuracy(model, tokenizer, held, temperature=args.temperature, **sampling)
    acc_t1 = acc if args.temperature == 1.0 else caption_accuracy(model, tokenizer, held, **sampling)[0]
    grid = save_grid(samples, out / "heldout_samples.png", nrow=args.per_caption)
    (out / "heldout_samples.txt").write_text("".join(f"row {i + 1}: {caption_of(c)}\n" for i, c in enumerate(held)))
    timings["sample_eval_s"] = round(time.time() - t, 1)
    timings["total_s"] = round(time.time() - start, 1)

    results = {
        "heldout_accuracy": acc,
        "heldout_accuracy_temperature_1": acc_t1,
        "heldout_captions": len(held),
        "samples": len(samples),
        "dvae": tok,
        "timings": timings,
        "settings": vars(args),
    }
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print()
    print(f"[demo] held-out captions ({len(held)} combinations never trained on), {args.per_caption} samples each:")
    print(f"[demo]   every attribute right: {100 * acc['all']:.1f}%   (chance ~{100 / 108:.1f}%)")
    print(f"[demo]   colour {100 * acc['colour']:.1f}%, shape {100 * acc['shape']:.1f}%, "
          f"position {100 * acc['position']:.1f}%  (temperature {args.temperature}; at 1.0: {100 * acc_t1['all']:.1f}% "
          f"all right)")  # fmt: skip
    print(f"[demo] dVAE: {100 * tok['usage']:.1f}% of the codebook in use ({tok['dead_codes']} dead codes), "
          f"perplexity {tok['perplexity']:.1f}, reconstruction PSNR {tok['psnr']:.1f} dB")  # fmt: skip
    print(f"[demo] samples: {grid} (captions in {out / 'heldout_samples.txt'}); numbers: {out / 'results.json'}")
    print(f"[demo] time: dVAE {timings['dvae_s']:.0f} s, DALL-E {timings['dalle_s']:.0f} s, "
          f"sampling {timings['sample_eval_s']:.0f} s, total {timings['total_s'] / 60:.1f} min")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
