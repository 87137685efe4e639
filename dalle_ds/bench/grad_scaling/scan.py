"""The static scale scan: at fixed weights and one batch, one backward per scale 2^k in both
precision schemes (all-fp16 as DeepSpeed runs it; amp with every res block at 2^k), and which scales
every block can use."""

from __future__ import annotations

import math

import torch

from dalle_ds import DALLE, DalleConfig
from dalle_ds.training.grad_scaling import ResblockScalingConfig, install_resblock_scaling

from .fidelity import GOAL_COS, NonFiniteProbe, blocks_only, compare, load_weights, reference_grads, usable

__all__ = ["scale_scan", "scan_powers", "scan_summary"]


def scan_powers(settings) -> list[int]:
    if settings.scan_powers:
        a, b, s = (int(x) for x in settings.scan_powers.split(":"))
        return list(range(a, b, s))
    base = round(-math.log2(settings.loss_mult))
    return list(range(base - 4, base + 37, 3))


def scale_scan(
    weights: dict[str, torch.Tensor], config: DalleConfig, batch, settings, device: torch.device
) -> dict[str, dict[int, dict]]:
    """Per scheme ("all-fp16", "amp"), per power k: per-segment stats of one backward at the static scale 2^k."""
    powers = scan_powers(settings)
    batch = tuple(t.to(device) for t in batch)
    out: dict[str, dict[int, dict]] = {"all-fp16": {}, "amp": {}}
    # all-fp16: DeepSpeed's fp16 engine computes exactly this (module.half(), loss * scale, backward)
    rounded = {n: w.half().float() for n, w in weights.items()}
    ref = reference_grads(DALLE(config).to(device), rounded, batch, settings.loss_mult)
    half = DALLE(config).to(device)
    load_weights(half, weights)
    half.half()
    for k in powers:
        half.zero_grad(set_to_none=True)
        (half(*batch).loss.float() * settings.loss_mult * 2.0**k).backward()
        out["all-fp16"][k] = compare({n: p.grad.float() / 2.0**k for n, p in half.named_parameters()}, ref, {})
    # amp: the per-resblock machinery, every branch at 2^k (rest: fp32, unscaled)
    ref = reference_grads(DALLE(config).to(device), weights, batch, settings.loss_mult)
    amp = DALLE(config).to(device)
    load_weights(amp, weights)
    probe = NonFiniteProbe(amp)
    lo, hi = min(powers), max(powers)
    scaler = install_resblock_scaling(
        amp, ResblockScalingConfig(initial_scale_power=lo, min_scale_power=lo, max_scale_power=hi)
    )
    for k in powers:
        for name in scaler.scales:
            scaler.set_scale(name, 2.0**k)  # also clears the flags
        probe.armed = True
        amp.zero_grad(set_to_none=True)
        (amp(*batch).loss * settings.loss_mult).backward()
        out["amp"][k] = compare({n: p.grad for n, p in amp.named_parameters()}, ref, probe.take())
    scaler.remove()
    return out


def scan_summary(scan: dict[str, dict[int, dict]]) -> dict:
    powers = sorted(scan["amp"])
    one_fp16 = [k for k in powers if usable(scan["all-fp16"][k], whole=True)]
    one_amp = [k for k in powers if usable(scan["amp"][k], whole=False)]
    windows = {}
    for seg in blocks_only(scan["amp"][powers[0]]):
        ok = [k for k in powers if scan["amp"][k][seg].cos >= GOAL_COS and scan["amp"][k][seg].overflow == 0]
        windows[seg] = (min(ok), max(ok)) if ok else None
    have = [w for w in windows.values() if w]
    inter = (max(w[0] for w in have), min(w[1] for w in have)) if have else None
    return {
        "powers": powers,
        "all_fp16_usable": one_fp16,
        "amp_uniform_usable": one_amp,
        "amp_block_windows": windows,
        "blocks_without_window": [s for s, w in windows.items() if w is None],
        "amp_windows_intersection": inter if inter and inter[0] <= inter[1] else None,
        "amp_highest_floor": max(have, key=lambda w: w[0]) if have else None,
        "amp_lowest_ceiling": min(have, key=lambda w: w[1]) if have else None,
        "floors": sorted({w[0] for w in have}),
        "ceilings": sorted({w[1] for w in have}),
        "floor_blocks": [s for s, w in windows.items() if w and have and w[0] == max(v[0] for v in have)],
        "ceiling_blocks": [s for s, w in windows.items() if w and have and w[1] == min(v[1] for v in have)],
    }
