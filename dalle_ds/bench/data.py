"""Throughput of the streaming data pipeline against raw PIL decoding of the same JPEGs
(``scripts/bench_data.py``, whose help describes the cases, prints the table): raw decode, the
per-image decode + crop without streaming, and ``StreamLoader`` with 0 .. N worker processes (with
caption tokenization in the workers), timed interleaved over rounds in this process."""

from __future__ import annotations

import io
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from dalle_ds import get_preset
from dalle_ds.data import DataConfig, StreamLoader, crop_tensor, read_image
from dalle_ds.data.synthetic import write_tar
from dalle_ds.data.text import CaptionEncoder, train_tokenizer

__all__ = ["WORDS", "make_captions", "make_jpegs", "measure", "write_shards"]

WORDS = ["red", "green", "small", "large", "circle", "house", "tree", "dog", "near", "river", "at", "night"]


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


def make_captions(n: int, seed: int = 1) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 6)) for _ in range(n)]


def measure(
    jpegs: list[bytes],
    captions: list[str],
    image_size: int,
    batch_size: int,
    shards: int,
    max_workers: int,
    rounds: int,
) -> dict:
    """Images/s of each case per round (``rates``), the images each case counted (``images``: the
    pipelines' clocks start at their first batch, which they leave out) and the pipelines' seconds
    to their first batch (``startup``), on ``jpegs`` written into ``shards`` WebDataset shards."""
    config = get_preset("dalle-tiny")
    tokenizer = train_tokenizer(captions, min(config.text_vocab_size, 256))

    def raw() -> int:
        for data in jpegs:
            Image.open(io.BytesIO(data)).convert("RGB")
        return len(jpegs)

    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp), jpegs, captions, shards)
        # Captions tokenized (BPE dropout 0.1) where the trainer has it done: in the data workers.
        encoder = CaptionEncoder(tokenizer, config, bpe_dropout=0.1)
        cfg = DataConfig(tmp, image_size=image_size, shuffle_buffer=64, caption_encoder=encoder)

        startup: dict[str, list[float]] = {}

        def pipeline(name: str, workers: int):
            def run() -> tuple[int, float]:
                # Steady state: the clock starts at the first batch (opening the source and starting
                # workers happens once per epoch, ~millions of images at scale; reported apart).
                n, start, opened = 0, None, time.perf_counter()
                for batch in StreamLoader(cfg, batch_size, num_workers=workers, epochs=1):
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
            need = -(-image_size * 9 // 8)
            for data in jpegs:
                crop_tensor(read_image(data, need, cfg.max_pixels, cfg.fast_jpeg), image_size, aug)
            return len(jpegs)

        cases = {"raw decode": raw, "decode+crop": decode_crop, "pipeline": pipeline("pipeline", 0)}
        for n in range(1, max_workers + 1):
            cases[f"pipeline x{n} workers"] = pipeline(f"pipeline x{n} workers", n)
        rates: dict[str, list[float]] = {name: [] for name in cases}
        images: dict[str, list[int]] = {name: [] for name in cases}
        for _ in range(rounds):
            for name, fn in cases.items():
                start = time.perf_counter()
                result = fn()
                count, seconds = result if isinstance(result, tuple) else (result, time.perf_counter() - start)
                rates[name].append(count / seconds)
                images[name].append(count)
    return {"rates": rates, "images": images, "startup": startup}
