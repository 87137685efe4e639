"""speed/attention-flex: each attention implementation timed at the paper's sequence and checked
against the dense reference.

For each layer kind (row, column, conv) and each of

  dense       SDPA with the full boolean mask (the reference)
  causal      SDPA with ``is_causal=True``: FlashAttention on a GPU, the floor the sparse paths must beat
  block       the block path (split softmax, :mod:`dalle_ds.models.split_kernels`)
  flex        FlexAttention with the layer's BlockMask, its kernel compiled (``torch.compile``)
  flex_eager  FlexAttention uncompiled (PyTorch's reference, forms every score)

it times forward + backward in bf16 (interleaved rounds, medians) at text 256 + 32x32 with the
``dalle-1.3b`` heads, compares outputs and gradients with fp32 dense attention (the ``attention/bf16``
check's tolerances), and weights the medians by the paper's 64-layer schedule (47 row, 16 column,
1 conv): the mix's speed against causal FlashAttention, with the goal (1.8x) beside it. The speeds
are reported, not judged: the check fails only on values.

``--cpu-smoke``: tiny sizes in fp32 on the CPU, where FlexAttention has no backward, so every
implementation is timed forward-only (gradients are still compared for the others).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

from .context import CheckFailed, Ctx, strict_fp32, sync
from .kernel_checks import BF16_VS_FP32_TOL, FP32_TOL, _errors, _worst

__all__ = ["MIX_GOAL", "SPEED_IMPLS", "SPEED_SMOKE", "mix_ratios", "worker_attention_speed"]

SPEED_IMPLS = ("dense", "causal", "block", "flex", "flex_eager")
MIX_GOAL = 1.8  # the 64-layer mix's forward + backward speed against causal FlashAttention, bf16
SPEED_SMOKE = {"text_len": 16, "grid": 8, "heads": 2, "head_dim": 16, "batch": 2, "conv_kernel": 5, "rounds": 3}


def _speed_full() -> dict:
    from dalle_ds import get_preset

    c = get_preset("dalle-1.3b")
    return {"text_len": c.text_len, "grid": c.image_grid, "heads": c.n_heads, "head_dim": c.head_dim, "batch": 4,
            "conv_kernel": c.conv_kernel, "rounds": 10}  # fmt: skip


def _fn(impl: str, kind: str, s: dict):
    import torch.nn.functional as F

    from dalle_ds import DalleConfig
    from dalle_ds.models.attention import block_attention, dense_attention, flex_attention

    T, W, K = s["text_len"], s["grid"], s["conv_kernel"]
    d = DalleConfig()
    rows = d.conv_block_rows if kind == "conv" else d.block_rows
    return {
        "dense": lambda q, k, v: dense_attention(q, k, v, kind, T, W, K),
        "causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "block": lambda q, k, v: block_attention(q, k, v, kind, T, W, K, rows),
        "flex": lambda q, k, v: flex_attention(q, k, v, kind, T, W, K, compile=True),
        "flex_eager": lambda q, k, v: flex_attention(q, k, v, kind, T, W, K, compile=False),
    }[impl]


def mix_ratios(medians: dict[str, dict[str, float]], n_layers: int = 64) -> dict[str, float]:
    """Per implementation: the ``n_layers`` schedule's time with causal attention in every layer over
    its own (each kind's median weighted by its layers); > 1 is faster than causal."""
    from dalle_ds import layer_schedule

    counts = Counter(layer_schedule(n_layers))
    total = {impl: sum(counts[k] * medians[k][impl] for k in counts) for impl in medians["row"]}
    return {impl: total["causal"] / t for impl, t in total.items()}


def worker_attention_speed(ctx: Ctx, p: dict) -> tuple[str, dict]:
    import torch

    strict_fp32()
    s = SPEED_SMOKE if ctx.smoke else _speed_full()
    device = torch.device(ctx.device)
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    backward = not ctx.smoke  # FlexAttention has no CPU backward: the smoke times forwards only
    T, W, H, hd, B = s["text_len"], s["grid"], s["heads"], s["head_dim"], s["batch"]
    n = T + W * W
    ctx.say(
        f"text {T} + image {W}x{W} = {n} positions, {H} heads of {hd}, batch {B}, {str(dtype)[6:]} on {device}; "
        f"{'forward + backward' if backward else 'forward only'}, {s['rounds']} interleaved rounds"
    )
    g = torch.Generator().manual_seed(0)
    q32, k32, v32, w32 = (torch.randn(B, H, n, hd, generator=g).to(device) for _ in range(4))

    def run(fn, dt, grads: bool):
        q, k, v = (t.to(dt).requires_grad_(grads) for t in (q32, k32, v32))
        out = fn(q, k, v)
        if not grads:
            return {"out": out.detach().float()}
        out.backward(w32.to(dt))
        return {"out": out.detach().float(), "q.grad": q.grad.float(), "k.grad": k.grad.float(),
                "v.grad": v.grad.float()}  # fmt: skip

    details = {"sizes": s, "device": str(device), "dtype": str(dtype)[6:], "backward": backward, "kinds": {}}
    failures, medians = [], {}
    for kind in ("row", "column", "conv"):
        fns = {impl: _fn(impl, kind, s) for impl in SPEED_IMPLS}  # built once: the timed calls are the kernels'
        ref = run(fns["dense"], torch.float32, True)
        tol = FP32_TOL
        if dtype != torch.float32:  # as attention/bf16: 5e-2, or twice what bf16 dense is off by
            tol = max(BF16_VS_FP32_TOL, 2 * _worst(_errors(run(fns["dense"], dtype, True), ref))[0])
        info = {"tol": tol, "error": {}, "median_ms": {}}
        for impl in SPEED_IMPLS:
            if impl == "causal":
                continue  # another function: nothing to compare
            grads = backward or not impl.startswith("flex")
            got = run(fns[impl], dtype, grads)
            rel, err, worst = _worst(_errors(got, {key: ref[key] for key in got}))
            info["error"][impl] = {"rel_to_max": rel, "max_abs": err, "worst": worst, "grads": grads}
            if rel > tol:
                failures.append(f"{kind}/{impl}")

        def step(impl, fns=fns):
            q, k, v = (t.to(dtype).requires_grad_(backward) for t in (q32, k32, v32))
            with torch.set_grad_enabled(backward):
                out = fns[impl](q, k, v)
                if backward:
                    out.backward(w32.to(dtype))

        for impl in SPEED_IMPLS:  # warm-up: compiles, caches masks and plans
            step(impl)
            step(impl)
        times = {impl: [] for impl in SPEED_IMPLS}
        for r in range(s["rounds"]):
            order = SPEED_IMPLS[r % len(SPEED_IMPLS) :] + SPEED_IMPLS[: r % len(SPEED_IMPLS)]
            for impl in order:
                sync(ctx.device)
                t0 = time.perf_counter()
                step(impl)
                sync(ctx.device)
                times[impl].append(1000 * (time.perf_counter() - t0))
        medians[kind] = info["median_ms"] = {impl: statistics.median(ts) for impl, ts in times.items()}
        details["kinds"][kind] = info
        errs = ", ".join(f"{i} {e['rel_to_max']:.1e}" for i, e in info["error"].items())
        ms = ", ".join(f"{i} {m:.2f}" for i, m in info["median_ms"].items())
        ctx.say(f"  {kind:<6} ms: {ms}; error vs fp32 dense (rel to max, tol {tol:.2g}): {errs}")
    ratios = mix_ratios(medians)
    details["mix_speed_vs_causal"] = {impl: round(r, 3) for impl, r in ratios.items()}
    details["mix_goal_vs_causal"] = MIX_GOAL
    best = max((i for i in ratios if i not in ("causal", "dense")), key=ratios.get)
    details["fastest_sparse"] = best
    details["summary"] = (
        "64-layer mix, speed vs causal: "
        + ", ".join(f"{i} {r:.2f}x" for i, r in ratios.items() if i != "causal")
        + f"; fastest sparse path {best} ({ratios[best]:.2f}x, goal {MIX_GOAL}x"
        + ("" if backward else ", forward only on the CPU")
        + ")"
    )
    ctx.say("  " + details["summary"])
    if failures:
        raise CheckFailed(f"outputs or gradients outside tolerance: {failures}", details)
    return "PASS", details
