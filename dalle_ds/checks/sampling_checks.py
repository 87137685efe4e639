"""sampling/pipeline: a saved pipeline sampled the ways users sample it, on the device.

- fp32 (strict): the full cache, the bounded cache and recomputation draw the same tokens, plain and
  with classifier-free guidance, candidates sharing one prefill and primed rows included.
- No per-token host sync: CUDA's sync debug mode counts the synchronising calls of a whole
  ``generate``; the count must not grow with the number of tokens drawn (setup copies are fine).
- bf16 weights: every cache mode samples valid codes (agreement with fp32 reported, not required).
- accelerate: the sharded folder loaded with blocks on GPU 0, the CPU and disk samples the same
  tokens as the folder loaded whole onto the device.
- FID on the device: ``generate_and_score`` with a small feature extractor (not the Inception).
"""

from __future__ import annotations

import time
import warnings

from .context import CheckFailed, Ctx, strict_fp32, sync

__all__ = ["worker_sampling"]

CAPTION = "a red circle at the top left"


def _pipeline(work, smoke: bool):
    """A random-weight pipeline saved sharded (4 shards or more): (folder, preset)."""
    import torch

    from dalle_ds import DALLE, DiscreteVAE, get_preset
    from dalle_ds.data.synthetic import ALL_COMBOS, caption_of
    from dalle_ds.data.text import train_tokenizer
    from dalle_ds.inference.generation import add_pipeline_parts
    from dalle_ds.inference.serialization import save_model

    preset, dvae_preset = ("dalle-tiny", "dvae-tiny") if smoke else ("dalle-small", "dvae-small")
    torch.manual_seed(0)
    model = DALLE(get_preset(preset))
    with torch.no_grad():  # sharper than an untrained model's near-uniform logits: no near-ties
        model.image_emb.weight.mul_(8)
    size = sum(t.nbytes for t in model.state_dict().values())
    tok = work / "tokenizer_src.json"
    train_tokenizer([caption_of(c) for c in ALL_COMBOS], 64, tok)
    folder = save_model(model, work / "pipeline", max_shard_size=size // 4)
    return add_pipeline_parts(folder, tok, DiscreteVAE(get_preset(dvae_preset))), preset


def _syncs(fn, device) -> int:
    """Synchronising CUDA calls while ``fn`` runs (CUDA's sync debug mode, as warnings); 0 on the CPU."""
    import torch

    if device.type != "cuda":
        fn()
        return 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def worker_sampling(ctx: Ctx, p: dict) -> tuple[str, dict]:
    import torch

    from dalle_ds.inference.big_model import infer_device_map, load_pipeline_dispatched
    from dalle_ds.inference.generation import load_pipeline, sample_images

    strict_fp32()
    device = torch.device(ctx.device)
    folder, preset = _pipeline(ctx.work, ctx.smoke)
    model, tokenizer = load_pipeline(folder, map_location=device)
    model.eval()
    c = model.config
    details: dict = {"preset": preset, "image_len": c.image_len, "device": str(device)}
    failures = []

    from dalle_ds.data.text import encode_captions

    text = encode_captions(tokenizer, [CAPTION], c).to(device)
    prime = torch.randint(0, c.image_vocab_size, (1, 2 * c.image_grid), generator=torch.Generator().manual_seed(0))
    prime = prime.to(device)

    def gen(m=model, **kw):
        g = torch.Generator(device=device).manual_seed(1)
        return m.generate(text, top_k=32, prime=prime, num_samples=4, generator=g, **kw)

    # 1. fp32: every cache mode, plain and guided
    modes = {"recompute": {"use_cache": False}, "full": {"cache": "full"}, "bounded": {"cache": "bounded"}}
    fp32, secs = {}, {}
    for scale in (1.0, 3.0):
        for name, kw in modes.items():
            sync(ctx.device)
            t0 = time.perf_counter()
            fp32[name, scale] = gen(cond_scale=scale, **kw)
            sync(ctx.device)
            secs[name, scale] = time.perf_counter() - t0
        same = all(torch.equal(fp32[name, scale], fp32["full", scale]) for name in modes)
        details[f"fp32_cond_scale_{scale:g}_same_tokens"] = same
        if not same:
            failures.append(f"fp32 cache modes differ at cond_scale {scale:g}")
    tokens = 4 * (c.image_len - prime.shape[1])
    details["tokens_per_s"] = {f"{n} cond_scale {s:g}": round(tokens / t, 1) for (n, s), t in secs.items()}
    ctx.say(f"  fp32 same tokens: {[details[k] for k in details if k.endswith('same_tokens')]}")

    # 2. no per-token host sync
    for cache in ("full", "bounded"):
        short = _syncs(lambda cache=cache: gen(cache=cache, cond_scale=3.0), device)
        g = torch.Generator(device=device).manual_seed(1)
        long = _syncs(lambda cache=cache, g=g: model.generate(text, top_k=32, num_samples=4, generator=g, cache=cache,
                                                               cond_scale=3.0), device)  # fmt: skip
        details[f"syncs_{cache}"] = {"primed": short, "whole image": long}
        if long > short:
            failures.append(f"{cache} cache: {long} synchronising calls for {c.image_len} tokens vs {short} for fewer")
    ctx.say(f"  synchronising calls per generate: {details['syncs_full']} (full), {details['syncs_bounded']} (bounded)")

    # 3. bf16 weights
    half, _ = load_pipeline(folder, map_location=device)
    half.eval().to(torch.bfloat16).dvae.float()
    for name, kw in modes.items():
        codes = gen(half, **kw)
        valid = bool(((codes >= 0) & (codes < c.image_vocab_size)).all())
        agree = float((codes == fp32[name, 1.0]).float().mean())
        details[f"bf16_{name}"] = {"valid": valid, "agreement_with_fp32": round(agree, 3)}
        if not valid:
            failures.append(f"bf16 {name}: codes outside the codebook")
    del half

    # 4. accelerate: blocks on the main device, the CPU and disk
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes

    with init_empty_weights():
        empty = type(model)(c)
    sizes = compute_module_sizes(empty)
    block, outside = sizes["blocks.0"], sizes[""] - sizes["blocks"]
    slack = 4096
    if device.type == "cuda":  # two blocks + the reserve on GPU 0 and on the CPU, the rest on disk
        budget = {device.index or 0: outside + 3 * block + slack, "cpu": 3 * block + slack}
    else:
        budget = {"cpu": outside + 3 * block + slack}
    placement = infer_device_map(empty, "sequential", budget)
    spread, _ = load_pipeline_dispatched(folder, "sequential", budget, ctx.work / "offload")
    ref = sample_images(model, tokenizer, CAPTION, 4, batch_size=4, seed=2, top_k=32)[1]
    got = sample_images(spread, tokenizer, CAPTION, 4, batch_size=4, seed=2, top_k=32)[1]
    where = sorted({str(d) for n, d in placement.items() if n.startswith("blocks.")})
    details["dispatched"] = {"blocks_on": where, "same_tokens": bool(torch.equal(ref, got))}
    if not torch.equal(ref, got):
        failures.append(f"blocks on {where}: tokens differ from the model loaded whole")
    if "disk" not in where:
        failures.append(f"the budget {budget} left no block on disk: placement {where}")
    ctx.say(f"  accelerate placement {where}: same tokens {details['dispatched']['same_tokens']}")
    del spread

    # 5. FID on the device, with a small extractor
    from dalle_ds.data.synthetic import SyntheticShapes
    from dalle_ds.inference.metrics import fid_metric, generate_and_score

    size = model.dvae.config.image_size
    items = [SyntheticShapes(8, size, seed=3)[i] for i in range(8)]
    batches = [{"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items]}]
    fid = fid_metric(_Pooled(), device=device)
    scores = generate_and_score(model, tokenizer, batches, 8, fid=fid, top_k=32)
    details["fid_small_extractor"] = scores.get("fid")
    if not (scores.get("fid") is not None and scores["fid"] == scores["fid"]):
        failures.append(f"FID on {device} is not a number: {scores}")

    details["summary"] = (
        f"{preset}: cache modes {'agree' if not any('cache modes' in f for f in failures) else 'DIFFER'}; "
        f"syncs full {details['syncs_full']}, bounded {details['syncs_bounded']}; accelerate {where}; "
        f"tokens/s full {details['tokens_per_s']['full cond_scale 1']}, "
        f"bounded {details['tokens_per_s']['bounded cond_scale 1']}"
    )
    ctx.say("  " + details["summary"])
    if failures:
        raise CheckFailed("; ".join(failures), details)
    return "PASS", details


def _Pooled():
    import torch
    import torch.nn.functional as F

    class Pooled(torch.nn.Module):
        """4x4 average pool + a fixed random projection to 8 features (torchmetrics reads num_features)."""

        num_features = 8

        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.randn(8, 48, generator=torch.Generator().manual_seed(0)))

        def forward(self, images):
            return F.adaptive_avg_pool2d(images.float(), 4).flatten(1) @ self.weight.T

    return Pooled()
