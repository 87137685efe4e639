#!/usr/bin/env python3
"""Sampling speed at the paper's sequence (text 256 + 32 x 32 image codes) for a small model.

    python scripts/bench_sample.py [--layers 8] [--d-model 256] [--batch 4] [--tokens 1024] [--threads 1]

One caption, ``--batch`` candidates, top-k 64, random weights (speed does not depend on them).
Timed in one process, interleaved over ``--rounds`` (the best round is reported):

  old sampler     the sampler before the on-device rewrite, reproduced inline: full KV cache, a host
                  ``torch.multinomial`` per token (a device -> host copy), codes grown by ``torch.cat``,
                  every candidate prefilling its own copy of the caption
  full cache      ``DALLE.generate(cache="full")``: draws on the device, one shared prefill
  bounded cache   ``DALLE.generate(cache="bounded")``: each layer keeps and attends only the keys its
                  kind can still see (dalle_ds/models/kv_cache.py)
  recompute       ``use_cache=False``: every token reruns the whole prefix. Too slow to run to the end
                  here: only ``--recompute-tokens`` tokens are timed, from the middle of the image (a
                  prefix of 256 + 512 positions, the average over a whole image)

The cached modes generate the last ``--tokens`` image codes (the first ones primed), prefill
included. Also printed: the KV cache memory each cache allocates, and whether the old sampler, the
full and the bounded cache drew the same tokens for the same seed (they should: the new draw is the
same exponential race ``torch.multinomial`` runs for one sample).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import torch

from dalle_ds import DALLE, layer_schedule
from dalle_ds.bench.sample import TOP_K, bench_config, measure
from dalle_ds.inference.big_model import DTYPES


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=256, help="heads of 64")
    p.add_argument("--batch", type=int, default=4, help="candidates for the one caption")
    p.add_argument("--tokens", type=int, default=1024, help="image codes generated per cached run (the last ones)")
    p.add_argument("--recompute-tokens", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--text-len", type=int, default=256)
    p.add_argument("--grid", type=int, default=32)
    p.add_argument("--image-vocab", type=int, default=8192)
    p.add_argument("--device", default="cpu", help="e.g. cuda: timings synchronise the device")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model weights")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = bench_config(args.layers, args.d_model, args.text_len, args.grid, args.image_vocab)
    N, B = config.image_len, args.batch
    if not 1 <= args.tokens <= N or not 1 <= args.recompute_tokens <= N // 2:
        p.error(f"--tokens must be in [1, {N}] and --recompute-tokens in [1, {N // 2}]")
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = DALLE(config).eval().to(device, DTYPES[args.dtype])
    text = torch.randint(0, config.text_vocab_size, (1, config.text_len)).to(device)
    prime = torch.randint(0, config.image_vocab_size, (1, N - args.tokens)).to(device)
    kinds = dict(Counter(layer_schedule(args.layers)))
    print(
        f"# bench_sample: text_len {config.text_len} + {args.grid}x{args.grid} image = {config.seq_len} positions, "
        f"{args.layers} layers {kinds}, d_model {args.d_model}, {config.n_heads} heads, image vocab "
        f"{config.image_vocab_size}, top-k {TOP_K}, batch {B}, {args.dtype} on {device}, {args.threads} thread(s), "
        f"torch {torch.__version__}"
    )
    result = measure(model, text, prime, B, args.recompute_tokens, args.rounds)
    rows, same = result["rows"], result["same_tokens"]
    print("\n| mode | tokens timed (x batch) | best s | tokens/s | vs old sampler | KV cache MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        mib = f"{row['cache_bytes'] / 2**20:.1f}" if row["cache_bytes"] is not None else "-"
        ratio = row["tokens_per_s"] / rows["old sampler"]["tokens_per_s"]
        print(
            f"| {name} | {row['tokens']} x {B} | {row['seconds']:.3f} | {row['tokens_per_s']:.1f} | {ratio:.2f}x "
            f"| {mib} |"
        )
    if device.type == "cpu":
        print(
            f"\nsame tokens as the old sampler (same seed): full cache {same['full cache']}, "
            f"bounded cache {same['bounded cache']}"
        )
    else:
        print(f"\nsame tokens, bounded vs full cache (same seed, {device}): {same['bounded cache vs full cache']}")
    print(
        f"recompute: {args.recompute_tokens} token(s) timed from image position {N // 2} "
        f"(prefix {config.text_len + N // 2}); cached modes: the last {args.tokens} codes, prefill included"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "same_tokens": same}, f, indent=1)
    return 0 if all(same.values()) or device.type != "cpu" else 1  # off the CPU, reduced precision may differ


if __name__ == "__main__":
    raise SystemExit(main())
