#!/usr/bin/env python3
"""Throughput of the streaming data pipeline against raw PIL decoding of the same JPEGs.

    python scripts/bench_data.py [--images 512] [--size 512x384] [--image-size 256] [--rounds 3]

Writes `--images` JPEGs (smooth random content, quality 90) with captions into WebDataset shards
in a temporary folder, then measures in this process, interleaved over `--rounds`:

  raw decode   PIL: open + full decode to RGB of every JPEG's bytes (already in memory)
  decode+crop  dalle_ds.data.read_image + crop_tensor on the same bytes: the per-image work with
               no streaming (draft/fast-DCT decoding, the crop's resampling to a uint8 tensor)
  pipeline     dalle_ds.data.StreamLoader, 0 workers (one core): read shards -> decode (draft
               mode) -> filters -> paper crop -> tensors -> batches, plus BPE tokenization (dropout
               0.1) and padding of the captions (dalle_ds.data.text.CaptionEncoder, in the workers)
  pipeline xN  the same with N data-loader worker processes (N = 1 .. --max-workers)

and prints images/s and each ratio to raw decode (median over rounds).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from dalle_ds.bench.data import make_captions, make_jpegs, measure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", default="512x384")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--max-workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(1)
    w, h = (int(v) for v in args.size.split("x"))
    jpegs = make_jpegs(args.images, (w, h))
    captions = make_captions(args.images)
    result = measure(jpegs, captions, args.image_size, args.batch_size, args.shards, args.max_workers, args.rounds)
    rates, startup = result["rates"], result["startup"]
    base = statistics.median(rates["raw decode"])
    print(f"{args.images} JPEGs {w}x{h} -> {args.image_size}px crops, batch {args.batch_size}, {args.rounds} rounds")
    print("| setting | images/s | vs raw decode | first batch after (s) |")
    print("|---|---|---|---|")
    for name, values in rates.items():
        rate = statistics.median(values)
        first = f"{statistics.median(startup[name]):.2f}" if name in startup else ""
        print(f"| {name} | {rate:.0f} | {rate / base:.2f} | {first} |")


if __name__ == "__main__":
    main()
