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
import io
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dalle_ds import get_preset
from dalle_ds.data import DataConfig, StreamLoader, crop_tensor, read_image
from dalle_ds.data.synthetic import write_tar
from dalle_ds.data.text import CaptionEncoder, train_tokenizer


def make_jpegs(n: int, size: tuple[int, int], seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # smooth content, like photos
        img = Image.fromarray(small).resize(size, Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def write_shards(root: Path, jpegs: list[bytes], captions: list[str], shards: int) -> None:
    samples = [
        (f"{i:08d}", {"jpg": d, "txt": c.encode()}) for i, (d, c) in enumerate(zip(jpegs, captions, strict=True))
    ]
    for shard in range(shards):
        write_tar(root / f"bench-{shard:03d}.tar", samples[shard::shards])


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
    words = ["red", "green", "small", "large", "circle", "house", "tree", "dog", "near", "river", "at", "night"]
    rng = np.random.default_rng(1)
    captions = [" ".join(rng.choice(words, 6)) for _ in range(args.images)]
    config = get_preset("dalle-tiny")
    tokenizer = train_tokenizer(captions, min(config.text_vocab_size, 256))

    def raw() -> int:
        for data in jpegs:
            Image.open(io.BytesIO(data)).convert("RGB")
        return len(jpegs)

    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp), jpegs, captions, args.shards)
        # Captions tokenized (BPE dropout 0.1) where the trainer has it done: in the data workers.
        encoder = CaptionEncoder(tokenizer, config, bpe_dropout=0.1)
        cfg = DataConfig(tmp, image_size=args.image_size, shuffle_buffer=64, caption_encoder=encoder)

        startup: dict[str, list[float]] = {}

        def pipeline(name: str, workers: int):
            def run() -> tuple[int, float]:
                # Steady state: the clock starts at the first batch (opening the source and starting
                # workers happens once per epoch, ~millions of images at scale; reported apart).
                n, start, opened = 0, None, time.perf_counter()
                for batch in StreamLoader(cfg, args.batch_size, num_workers=workers, epochs=1):
                    assert batch["text"].shape == (len(batch["caption"]), config.text_len)
                    if start is None:
                        start = time.perf_counter()
                        startup.setdefault(name, []).append(start - opened)
                        continue
                    n += len(batch["caption"])
                return n, time.perf_counter() - start

            return run

        def decode_crop() -> int:
            aug = random.Random(0)
            need = -(-args.image_size * 9 // 8)
            for data in jpegs:
                crop_tensor(read_image(data, need, cfg.max_pixels, cfg.fast_jpeg), args.image_size, aug)
            return len(jpegs)

        cases = {"raw decode": raw, "decode+crop": decode_crop, "pipeline": pipeline("pipeline", 0)}
        for n in range(1, args.max_workers + 1):
            cases[f"pipeline x{n} workers"] = pipeline(f"pipeline x{n} workers", n)
        rates: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):
            for name, fn in cases.items():
                start = time.perf_counter()
                result = fn()
                count, seconds = result if isinstance(result, tuple) else (result, time.perf_counter() - start)
                rates[name].append(count / seconds)
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
