"""Sampling speed and KV-cache memory of every cache mode, against the sampler before the on-device
rewrite reproduced inline (``scripts/bench_sample.py`` prints the table)."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from dalle_ds import DALLE, DalleConfig
from dalle_ds.models.dalle import filter_logits, sample_logits
from dalle_ds.models.kv_cache import BoundedKVCache, KVCache

__all__ = ["TOP_K", "bench_config", "cache_bytes", "measure", "old_generate", "recompute_steps"]

TOP_K = 64


def bench_config(layers: int, d_model: int, text_len: int, grid: int, image_vocab: int) -> DalleConfig:
    """The benchmark's model: heads of 64, a 1024-token text vocabulary."""
    return DalleConfig(
        text_len=text_len,
        image_grid=grid,
        image_vocab_size=image_vocab,
        d_model=d_model,
        n_heads=max(1, d_model // 64),
        n_layers=layers,
        text_vocab_size=1024,
    )


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


def measure(model: DALLE, text, prime, batch: int, recompute_tokens: int, rounds: int) -> dict:
    """Time every mode (interleaved over ``rounds``; the best round counts) for ``batch`` candidates of
    the caption ``text`` (1, text_len) after the primed codes ``prime`` (1, n); ``recompute`` draws
    ``recompute_tokens`` from the middle of the image. Returns per mode: tokens timed, best seconds,
    tokens/s (batch x tokens / seconds), KV-cache bytes; and whether the cached modes drew the old
    sampler's tokens (on the CPU) or the same tokens as each other (elsewhere)."""
    config, device = model.config, text.device
    N, B, tokens = config.image_len, batch, config.image_len - prime.shape[1]

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
    modes["recompute"] = lambda: recompute_steps(model, text.expand(B, -1), mid, recompute_tokens, seeded())
    timed = {name: recompute_tokens if name == "recompute" else tokens for name in modes}
    best, outputs = {}, {}
    for _ in range(rounds):
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
    if device.type == "cpu":
        same = {n: bool(torch.equal(outputs[n], outputs["old sampler"])) for n in ("full cache", "bounded cache")}
    else:  # the old sampler draws on the host from the CPU generator, the new one on the device
        same = {"bounded cache vs full cache": bool(torch.equal(outputs["bounded cache"], outputs["full cache"]))}
    rows = {
        name: {"tokens": timed[name], "seconds": best[name], "tokens_per_s": rate[name], "cache_bytes": mem.get(name)}
        for name in modes
    }
    return {"rows": rows, "same_tokens": same}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
