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
import time
from collections import Counter

import torch
import torch.nn.functional as F

from dalle_ds import DALLE, DalleConfig, layer_schedule
from dalle_ds.inference.big_model import DTYPES
from dalle_ds.models.dalle import filter_logits, sample_logits
from dalle_ds.models.kv_cache import BoundedKVCache, KVCache

TOP_K = 64


@torch.no_grad()
def old_generate(model: DALLE, text, prime, generator):
    """The sampler as it was: full cache, host multinomial, ``torch.cat`` per token."""
    c = model.config
    codes = prime

    def draw(logits):
        logits = filter_logits(logits / 1.0, TOP_K, 1.0)
        return torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).to(text.device)

    caches = [KVCache() for _ in model.blocks]
    w_image = model._unembed_weights()[1].float()
    h = model.embed(text, codes)
    for i in range(codes.shape[1], c.image_len):
        for block, cache in zip(model.blocks, caches, strict=True):
            h = block(h, cache)
        nxt = draw(F.linear(model.ln_f(h[:, -1]).float(), w_image))
        codes = torch.cat([codes, nxt], dim=1)
        h = model.drop(model._image_embed(nxt, i))
    return codes


@torch.no_grad()
def recompute_steps(model: DALLE, text, prefix, steps: int, generator):
    """``steps`` tokens the way ``generate(use_cache=False)`` draws them, from ``prefix`` on."""
    codes = prefix
    for _ in range(steps):
        nxt = sample_logits(model.next_image_logits(text, codes), TOP_K, generator=generator)
        codes = torch.cat([codes, nxt], dim=1)
    return codes


@torch.no_grad()
def cache_bytes(model: DALLE, text, batch: int, kind) -> int:
    """Bytes the caches of every layer hold after the caption's prefill and expansion to the batch."""
    caches = [kind() for _ in model.blocks]
    h = model.embed(text, torch.zeros(1, 0, dtype=torch.long, device=text.device))
    for block, cache in zip(model.blocks, caches, strict=True):
        h = block(h, cache)
        cache.expand(batch)
    return sum(t.nbytes for cache in caches for t in vars(cache).values() if isinstance(t, torch.Tensor))


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
    config = DalleConfig(
        text_len=args.text_len,
        image_grid=args.grid,
        image_vocab_size=args.image_vocab,
        d_model=args.d_model,
        n_heads=max(1, args.d_model // 64),
        n_layers=args.layers,
        text_vocab_size=1024,
    )
    N, B = config.image_len, args.batch
    if not 1 <= args.tokens <= N or not 1 <= args.recompute_tokens <= N // 2:
        p.error(f"--tokens must be in [1, {N}] and --recompute-tokens in [1, {N // 2}]")
    torch.manual_seed(0)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    model = DALLE(config).eval().to(device, dtype)
    text = torch.randint(0, config.text_vocab_size, (1, config.text_len)).to(device)
    prime = torch.randint(0, config.image_vocab_size, (1, N - args.tokens)).to(device)
    kinds = dict(Counter(layer_schedule(args.layers)))
    print(
        f"# bench_sample: text_len {config.text_len} + {args.grid}x{args.grid} image = {config.seq_len} positions, "
        f"{args.layers} layers {kinds}, d_model {args.d_model}, {config.n_heads} heads, image vocab "
        f"{config.image_vocab_size}, top-k {TOP_K}, batch {B}, {args.dtype} on {device}, {args.threads} thread(s), "
        f"torch {torch.__version__}"
    )

    def seeded():
        return torch.Generator().manual_seed(0)

    modes = {
        "old sampler": lambda: old_generate(model, text.expand(B, -1), prime.expand(B, -1), seeded()),
        "full cache": lambda: model.generate(text, TOP_K, prime=prime, num_samples=B, generator=seeded()),
        "bounded cache": lambda: model.generate(
            text, TOP_K, prime=prime, num_samples=B, generator=seeded(), cache="bounded"
        ),
    }
    mid = torch.randint(0, config.image_vocab_size, (B, N // 2)).to(device)
    modes["recompute"] = lambda: recompute_steps(model, text.expand(B, -1), mid, args.recompute_tokens, seeded())
    timed = {name: args.recompute_tokens if name == "recompute" else args.tokens for name in modes}
    best, outputs = {}, {}
    for _ in range(args.rounds):
        for name, fn in modes.items():
            sync(device)
            t0 = time.perf_counter()
            outputs[name] = fn()
            sync(device)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - t0)
    rate = {name: B * timed[name] / best[name] for name in modes}
    mem = {
        "full cache": cache_bytes(model, text, B, KVCache),
        "bounded cache": cache_bytes(model, text, B, BoundedKVCache),
    }
    mem["old sampler"] = mem["full cache"]
    print("\n| mode | tokens timed (x batch) | best s | tokens/s | vs old sampler | KV cache MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in modes:
        mib = f"{mem[name] / 2**20:.1f}" if name in mem else "-"
        ratio = rate[name] / rate["old sampler"]
        print(f"| {name} | {timed[name]} x {B} | {best[name]:.3f} | {rate[name]:.1f} | {ratio:.2f}x | {mib} |")
    same = {name: bool(torch.equal(outputs[name], outputs["old sampler"])) for name in ("full cache", "bounded cache")}
    if device.type == "cpu":
        print(
            f"\nsame tokens as the old sampler (same seed): full cache {same['full cache']}, "
            f"bounded cache {same['bounded cache']}"
        )
    else:  # the old sampler draws on the host from the CPU generator, the new one on the device
        same = {"bounded cache vs full cache": bool(torch.equal(outputs["bounded cache"], outputs["full cache"]))}
        print(f"\nsame tokens, bounded vs full cache (same seed, {device}): {same['bounded cache vs full cache']}")
    print(
        f"recompute: {args.recompute_tokens} token(s) timed from image position {N // 2} "
        f"(prefix {config.text_len + N // 2}); cached modes: the last {args.tokens} codes, prefill included"
    )
    if args.json:
        rows = {
            name: {
                "tokens": timed[name],
                "seconds": best[name],
                "tokens_per_s": rate[name],
                "cache_bytes": mem.get(name),
            }
            for name in modes
        }
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "same_tokens": same}, f, indent=1)
    return 0 if all(same.values()) or device.type != "cpu" else 1  # off the CPU, reduced precision may differ


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    raise SystemExit(main())
