"""throughput/<preset>: bf16 training steps (torch only) of a preset, tokens/s and model FLOPs
utilisation against the GPU's peak; the peak table and the FLOPs formula it uses (importable on the
CPU; tests/test_gpu_check.py)."""

from __future__ import annotations

import re
import time

from .context import CheckFailed, Ctx, finite

__all__ = [
    "FLOPS_FORMULA",
    "PEAK_BF16",
    "THROUGHPUT_LAYOUTS",
    "measure_training",
    "model_flops",
    "peak_bf16_flops",
    "worker_throughput",
]

# Peak dense (no sparsity) bf16 tensor-core FLOP/s from the vendors' datasheets, matched in order
# against torch.cuda.get_device_name().
PEAK_BF16: list[tuple[str, float]] = [
    (r"GH200", 989e12),
    (r"H200 NVL", 835e12),
    (r"H200", 989e12),
    (r"H100 NVL", 835e12),
    (r"H100 PCIe", 756e12),
    (r"H100|H800", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    (r"GB200", 2500e12),
    (r"B200", 2250e12),
    (r"A100|A800", 312e12),
    (r"L40S", 362e12),
    (r"L40\b", 181e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
]


def peak_bf16_flops(device_name: str) -> float | None:
    for pattern, peak in PEAK_BF16:
        if re.search(pattern, device_name):
            return peak
    return None


FLOPS_FORMULA = (
    "model FLOPs per step = 6 * N * B * n + 12 * d_model * B * sum over layers of the allowed (query, key) "
    "pairs of that layer's mask; N = all parameters (tied embeddings once), n = text_len + image_grid**2, "
    "B = sequences per step; 2 FLOPs per multiply-add, backward = 2 x forward, recomputation not counted"
)


def model_flops(config, batch: int) -> dict:
    """FLOPs of one training step (forward + backward) of ``batch`` full sequences (FLOPS_FORMULA)."""
    import torch

    from dalle_ds import DALLE, attention_mask, layer_schedule

    with torch.device("meta"):
        n_params = sum(p.numel() for p in DALLE(config).parameters())
    pairs = {
        kind: int(attention_mask(kind, config.text_len, config.image_grid, config.conv_kernel).sum())
        for kind in set(layer_schedule(config.n_layers))
    }
    attn_pairs = sum(pairs[kind] for kind in layer_schedule(config.n_layers))
    dense = 6 * n_params * batch * config.seq_len
    attention = 12 * config.d_model * batch * attn_pairs
    return {"params": n_params, "dense": dense, "attention": attention, "total": dense + attention, "pairs": pairs}


THROUGHPUT_WARMUP, THROUGHPUT_STEPS = 3, 6
# (micro batch, activation checkpointing) tried in order until one fits.
THROUGHPUT_LAYOUTS = [(8, False), (4, False), (4, True), (1, True)]


def measure_training(config, device: str, layouts, warmup: int, steps: int, say=print) -> dict:
    """Seconds per bf16 training step (autocast, fp32 master weights, AdamW, clipping 4) of
    ``config`` on full sequences, for the first (micro batch, activation checkpointing) layout
    that fits in memory. Warm-up steps first; timed between synchronisations."""
    import functools
    import gc

    import torch
    from torch.utils.checkpoint import checkpoint

    from dalle_ds import DALLE

    cuda = device == "cuda"
    torch.manual_seed(0)
    with torch.device(device):
        model = DALLE(config)
    model.train()
    kw = {"lr": 1e-4, "betas": (0.9, 0.96), "eps": 1e-8, "weight_decay": 0.045}
    try:
        opt = torch.optim.AdamW(model.parameters(), fused=True, **kw)
    except (RuntimeError, TypeError):
        opt = torch.optim.AdamW(model.parameters(), **kw)
    originals = [block.forward for block in model.blocks]

    def run_block(forward, x, cache=None):
        return checkpoint(forward, x, use_reentrant=False) if cache is None else forward(x, cache)

    def step(text, codes):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(text, image_codes=codes).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    g = torch.Generator().manual_seed(0)
    tried = []
    for batch, ckpt in layouts:
        for block, forward in zip(model.blocks, originals, strict=True):
            block.forward = functools.partial(run_block, forward) if ckpt else forward
        text = torch.randint(0, config.text_vocab_size, (batch, config.text_len), generator=g).to(device)
        codes = torch.randint(0, config.image_vocab_size, (batch, config.image_len), generator=g).to(device)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        oom = False
        try:
            for _ in range(warmup):
                step(text, codes)
            sync()
            losses = []
            t0 = time.perf_counter()
            for _ in range(steps):
                losses.append(step(text, codes))
            sync()
            secs = (time.perf_counter() - t0) / steps
        except torch.OutOfMemoryError:
            oom = True
        if not oom:
            return {
                "micro_batch": batch,
                "activation_checkpointing": ckpt,
                "tried": tried,
                "step_s": secs,
                "losses": [v.item() for v in losses],
                "params": sum(q.numel() for q in model.parameters()),
                "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else None,
            }
        # Outside the except block, so the traceback no longer holds the activations.
        tried.append(f"micro batch {batch}{' + checkpointing' if ckpt else ''}: out of memory")
        say("  " + tried[-1])
        opt.zero_grad(set_to_none=True)
        losses = text = codes = None
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    raise CheckFailed("no micro batch fits: " + "; ".join(tried), {"tried": tried})


def worker_throughput(ctx: Ctx, p: dict) -> tuple[str, dict]:
    import torch

    from dalle_ds import get_preset

    preset = p["preset"]
    config = get_preset(preset)
    if ctx.device == "cuda":
        name = torch.cuda.get_device_name(0)
        layouts, warmup, steps = THROUGHPUT_LAYOUTS, THROUGHPUT_WARMUP, THROUGHPUT_STEPS
    else:  # --cpu-smoke: the same code on a tiny preset
        name = "cpu"
        layouts, warmup, steps = [(2, False), (2, True)], 1, 2
    peak = peak_bf16_flops(name)
    ctx.say(f"{preset} on {name}")
    run = measure_training(config, ctx.device, layouts, warmup, steps, ctx.say)
    secs, batch, ckpt = run["step_s"], run["micro_batch"], run["activation_checkpointing"]
    flops = model_flops(config, batch)
    tokens = batch * config.seq_len
    achieved = flops["total"] / secs
    details = {
        "preset": preset,
        "device_name": name,
        "precision": "bf16 autocast, fp32 master weights, AdamW (fused where available), grad clipping 4",
        **run,
        "step_s": round(secs, 4),
        "tokens_per_step": tokens,
        "tokens_per_s": round(tokens / secs, 1),
        "formula": FLOPS_FORMULA,
        "flops_per_step": flops["total"],
        "flops_dense_per_step": flops["dense"],
        "flops_attention_per_step": flops["attention"],
        "achieved_tflops": round(achieved / 1e12, 3),
        "peak_bf16_flops": peak,
        "mfu": round(achieved / peak, 4) if peak else None,
    }
    mfu = f"MFU {100 * achieved / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s" if peak else "unknown peak: MFU skipped"
    mem = f", peak mem {run['peak_memory_gib']} GiB" if run["peak_memory_gib"] is not None else ""
    details["summary"] = (
        f"{run['params'] / 1e9:.3f}e9 params, micro batch {batch}{' + act. ckpt' if ckpt else ''}: "
        f"{tokens / secs:,.0f} tokens/s, {secs * 1000:.0f} ms/step, {achieved / 1e12:.1f} TFLOP/s, {mfu}{mem}"
    )
    ctx.say("  " + details["summary"])
    ctx.say("  " + FLOPS_FORMULA)
    ctx.say(f"  per step: 6*N*B*n = {flops['dense']:.4e}, attention = {flops['attention']:.4e}")
    if not finite(run["losses"]):
        raise CheckFailed(f"non-finite training losses {run['losses']}", details)
    return "PASS", details
