#!/usr/bin/env python3
"""Encode an image-text stream to image codes (a dVAE's or a VQGAN's) + captions in sharded Parquet,
for DALL-E training.

    python scripts/encode_images.py --dvae runs/dvae/final --data data/shapes --out data/codes
    deepspeed --num_gpus 8 scripts/encode_images.py ...      # or torchrun: one part per rank

Each rank (RANK / WORLD_SIZE from the launcher; no process group is needed) reads its disjoint part
of one epoch (centre crop, no augmentation, no shuffle) and writes ``codes-r{rank}-{n}.parquet``
files with columns ``codes`` (image_grid**2 ints), ``caption`` and, with ``--tokenizer``,
``text_ids`` (BPE ids, unpadded). ``train_dalle.py --data data/codes`` then streams codes and
skips the image tokenizer. Files are written atomically; bad inputs are skipped and counted in
``encode_counts-r{rank}.json``.
"""

import argparse
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from dalle_ds.data import DataConfig, StreamLoader
from dalle_ds.inference.serialization import load_dvae
from dalle_ds.utils.files import atomic_path
from dalle_ds.utils.images import as_float_image


def write_parquet(rows: dict, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.table(rows), str(tmp))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dvae", required=True, help="image tokenizer folder: a dVAE or a VQGAN (config.json + weights)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json: also store text_ids")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--rows-per-file", type=int, default=50_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--image-column", default=None)
    p.add_argument("--caption-column", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--local_rank", type=int, default=0, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    args = p.parse_args(argv)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dvae = load_dvae(args.dvae).to(args.device).eval()
    tokenizer = None
    if args.tokenizer:
        from dalle_ds.data.text import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    cfg = DataConfig(
        args.data,
        image_column=args.image_column,
        caption_column=args.caption_column,
        image_size=dvae.config.image_size,
        augment=False,
        shuffle_buffer=1,
        drop_last=False,
    )
    loader = StreamLoader(cfg, args.batch_size, rank, world, args.workers, epochs=1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list] = {"codes": [], "caption": []} | ({"text_ids": []} if tokenizer else {})
    files = 0

    def flush():
        nonlocal files, rows
        if rows["caption"]:
            write_parquet(rows, out / f"codes-r{rank:04d}-{files:05d}.parquet")
            files += 1
            rows = {k: [] for k in rows}

    with torch.no_grad():
        for batch in loader:
            images = as_float_image(batch["image"].to(args.device))  # the stream delivers uint8
            codes = dvae.encode(images).reshape(len(batch["caption"]), -1)
            rows["codes"] += codes.to(torch.int16 if dvae.config.codebook_size <= 32767 else torch.int32).tolist()
            rows["caption"] += batch["caption"]
            if tokenizer is not None:
                rows["text_ids"] += [enc.ids for enc in tokenizer.encode_batch(batch["caption"])]
            if len(rows["caption"]) >= args.rows_per_file:
                flush()
    flush()
    counts = loader.counters()
    (out / f"encode_counts-r{rank:04d}.json").write_text(json.dumps(counts, indent=1) + "\n")
    print(f"rank {rank}/{world}: {counts.get('samples', 0)} samples -> {files} files in {out}; counts {counts}")


if __name__ == "__main__":
    main()
