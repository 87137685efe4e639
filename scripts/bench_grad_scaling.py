#!/usr/bin/env python3
"""fp16 gradient fidelity of a deep, narrow DALL-E: one dynamic loss scale vs per-resblock scales.

    python scripts/bench_grad_scaling.py [--layers 48] [--d-model 64] [--steps 60] [--measure-every 10]
        [--init-std 0.02] [--loss-mult 1] [--ds-scale-power 16] [--quick] [--sweep]

1. Training. The same model (same initial weights, same batches, torch AdamW) is trained three ways in
one process, each through an in-process DeepSpeed engine at ZeRO stage 0, world size 1 (a 1-rank gloo group):

  fp32       DeepSpeed fp32: the baseline the losses and times are compared with
  ds-fp16    DeepSpeed fp16 with its dynamic loss scale: the module is cast to fp16 (parameters,
             residual stream, LayerNorms, embeddings; logits fp32 as the model computes them), fp32
             master weights in DeepSpeed's fp16 optimizer, one scale for the whole network. The backward
             goes through ``ds_adapter.backward``, which applies the loss scale DeepSpeed 0.19 forgets at ZeRO-0
  resblock   fp32 parameters in a DeepSpeed fp32 engine plus ``dalle_ds.training.grad_scaling``: every
             transformer block runs under fp16 autocast, every res block (the attention and the MLP branch
             of each layer) has its own scale; an update is skipped through ``skipping_step`` on the
             engine's inner optimizer

Every ``--measure-every`` steps, for ds-fp16 and resblock, the run's current weights are copied into a
plain fp32 model, which backpropagates the run's batch; per res block (``blocks.i.attn``: ln_1 + attention,
``blocks.i.mlp``: ln_2 + MLP; ``rest``: embeddings and ln_f) the run's parameter gradients, unscaled
(ds-fp16: divided by the engine's current loss scale), are compared with that reference:

  cos       cosine similarity to the reference (non-finite entries counted as zero)
  flush     share of the entries the reference has nonzero that are exactly zero in the run (underflow)
  mass      the reference's norm over those flushed entries / its whole norm: what the flushed entries carried
  overflow  share of non-finite entries (resblock: seen before the scaler zeroes them, by a probe hook)

2. Scale scan (``--scan``, on by default). At the fp32 run's final weights and last batch, one backward per
static scale 2^k, in both precision schemes: "all-fp16" (the model cast to fp16, as DeepSpeed's fp16 engine
runs it; reference at the fp16-rounded weights) and "amp" (the per-resblock machinery with EVERY branch scale
set to 2^k). A scale is usable when every block has cos >= 0.999 and nothing overflowed. The per-block usable
ranges of amp show whether the blocks need different scales: when their intersection is empty no single scale
serves them all, which is the case per-resblock scaling exists for.

``--loss-mult m`` multiplies the loss before backward in every run (and the reference): it stands in for the
1/(batch x positions) of a larger batch or a longer sequence, or a small loss weight; AdamW's eps is
multiplied by m so that the updates, and so the fp32 loss curve, do not change. ``--init-std`` sets the model's
``init_std``. ``--sweep`` runs a small grid of such settings and prints one summary table.

On the CPU, DeepSpeed refuses fp16 in one capability check; this script patches it as
tests/launch_env/sitecustomize.py does (the arithmetic runs). fp16 matmuls are about 8x slower than fp32 on
CPUs without native fp16, hence the small default. Only run on the CPU so far.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from dalle_ds import DALLE, DalleConfig
from dalle_ds.distributed import ds_adapter
from dalle_ds.training.grad_scaling import ResblockScalingConfig, install_resblock_scaling, skipping_step

METHODS = ("fp32", "ds-fp16", "resblock")
FP16_METHODS = ("ds-fp16", "resblock")
GOAL_COS = 0.999


# --- setup ----------------------------------------------------------------------------------------


def init_process_group() -> None:
    """A 1-rank gloo group for the in-process engines (as tests/conftest.py's single_process_group)."""
    import torch.distributed as dist

    from dalle_ds.distributed.collectives import free_port, init_distributed

    if dist.is_initialized():
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    init_distributed(dist_backend="gloo")


def allow_fp16_on_cpu() -> bool:
    """DeepSpeed's CPU accelerator says fp16 is unsupported (one capability check; the math runs):
    patch that check, as tests/launch_env/sitecustomize.py does under DALLE_DS_TEST_FP16_ON_CPU=1.
    Returns whether it patched."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu" or acc.is_fp16_supported():
        return False
    type(acc).is_fp16_supported = lambda self: True
    return True


def make_config(args) -> DalleConfig:
    return DalleConfig.from_name(
        "dalle-tiny",
        n_layers=args.layers,
        d_model=args.d_model,
        n_heads=args.heads,
        image_grid=args.image_grid,
        init_std=args.init_std,
    )


def make_batch(step: int, args, config: DalleConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Random text; image code j = (11 j + 37 (t mod 4)) mod V with t the first text token: a positional
    part the model learns in a few dozen steps, then two bits it must fetch from the text by attention.
    The same batch for every run at a given step."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
    text = torch.randint(0, config.text_vocab_size, (args.batch, config.text_len), generator=g)
    j = torch.arange(config.image_len)
    codes = (11 * j + 37 * (text[:, :1] % 4)) % config.image_vocab_size
    return text, codes


def ds_config(args, fp16: bool) -> dict:
    cfg = {
        "train_batch_size": args.batch,
        "train_micro_batch_size_per_gpu": args.batch,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": 0},
    }
    if fp16:
        cfg["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": args.ds_scale_power,
            "loss_scale_window": args.ds_window,
            "hysteresis": args.ds_hysteresis,
            "min_loss_scale": 1,
        }
    return cfg


def build_engine(model: torch.nn.Module, args, fp16: bool):
    opt = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.96), eps=1e-8 * args.loss_mult, weight_decay=0.0
    )
    engine, _, _ = ds_adapter.build_engine(model, ds_config(args, fp16), opt)
    return engine


# --- gradient comparison --------------------------------------------------------------------------


def segment_of(name: str) -> str:
    """The res block (scaler segment) a parameter belongs to, as install_resblock_scaling names them."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return f"blocks.{parts[1]}.{'attn' if parts[2] in ('ln_1', 'attn') else 'mlp'}"
    return "rest"


def segment_order(config: DalleConfig) -> list[str]:
    return [f"blocks.{i}.{b}" for i in range(config.n_layers) for b in ("attn", "mlp")] + ["rest"]


@dataclass
class SegStat:
    cos: float
    flush: float  # share of reference-nonzero entries that are exactly zero in the run
    flush_mass: float  # |reference over those entries| / |reference|
    overflow: float  # share of non-finite entries
    norm_ratio: float  # |run| / |reference|


def compare(
    run: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], nonfinite: dict[str, torch.Tensor]
) -> dict[str, SegStat]:
    """Per segment: ``run`` (unscaled fp32 gradients, maybe non-finite), ``ref`` (fp32 reference),
    ``nonfinite`` (extra per-parameter masks of entries that were non-finite before a filter)."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for name, r in ref.items():
        g = run[name].float()
        bad = ~torch.isfinite(g)
        if name in nonfinite:
            bad |= nonfinite[name]
        parts.setdefault(segment_of(name), []).append((torch.where(bad, 0.0, g).flatten(), r.flatten(), bad.flatten()))
    out = {}
    for seg, items in parts.items():
        g = torch.cat([i[0] for i in items]).double()
        r = torch.cat([i[1] for i in items]).double()
        bad = torch.cat([i[2] for i in items])
        nz = r != 0
        flushed = nz & (g == 0) & ~bad
        rn, gn = r.norm().item(), g.norm().item()
        out[seg] = SegStat(
            # not F.cosine_similarity: its eps (1e-8) clamps the norms, and at --loss-mult 1e-8 they are smaller
            cos=(g @ r).item() / (gn * rn) if rn > 0 and gn > 0 else (float("nan") if rn == 0 else 0.0),
            flush=flushed.sum().item() / max(1, nz.sum().item()),
            flush_mass=r[flushed].norm().item() / rn if rn > 0 else 0.0,
            overflow=bad.sum().item() / bad.numel(),
            norm_ratio=gn / rn if rn > 0 else float("nan"),
        )
    return out


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name].to(p.dtype))


def reference_grads(
    ref_model: DALLE, weights: dict[str, torch.Tensor], batch, loss_mult: float
) -> dict[str, torch.Tensor]:
    """fp32 gradients of ``loss * loss_mult`` at ``weights`` (cast to fp32) on ``batch``."""
    load_weights(ref_model, weights)
    ref_model.zero_grad(set_to_none=True)
    (ref_model(*batch).loss * loss_mult).backward()
    return {
        n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
        for n, p in ref_model.named_parameters()
    }


class NonFiniteProbe:
    """Tensor hooks registered BEFORE the scaler's (hooks run in registration order): they see the raw,
    scaled gradient and record which entries are non-finite, which the scaler then zeroes."""

    def __init__(self, model: torch.nn.Module):
        self.armed = False
        self.masks: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            p.register_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            if self.armed:
                bad = ~torch.isfinite(grad)
                self.masks[name] = self.masks[name] | bad if name in self.masks else bad

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        masks, self.masks = self.masks, {}
        return masks


def blocks_only(stats: dict[str, SegStat]) -> dict[str, SegStat]:
    return {s: v for s, v in stats.items() if s != "rest"}


# --- the three training runs ----------------------------------------------------------------------


@dataclass
class RunResult:
    method: str
    losses: list[float] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    measures: dict[int, dict[str, SegStat]] = field(default_factory=dict)  # step -> segment -> stat
    scales: list[float | dict] = field(default_factory=list)  # per step: ds loss scale / scaler stats
    final_scales: dict[str, float] = field(default_factory=dict)  # resblock: per-branch scales
    final_weights: dict[str, torch.Tensor] = field(default_factory=dict)  # fp32 run: for the scan
    note: str = ""


def train(method: str, init: DALLE, args, config: DalleConfig, log) -> RunResult:
    model = copy.deepcopy(init)
    res = RunResult(method)
    scaler = probe = None
    if method == "resblock":
        probe = NonFiniteProbe(model)  # before the scaler's hooks
        scaler = install_resblock_scaling(
            model, ResblockScalingConfig(initial_scale_power=args.resblock_scale_power), world_size=1
        )
    engine = build_engine(model, args, fp16=(method == "ds-fp16"))
    ref_model = DALLE(config).to(engine.device) if method in FP16_METHODS else None
    for step in range(args.steps):
        batch = tuple(t.to(engine.device) for t in make_batch(step, args, config))
        measure = method in FP16_METHODS and (step % args.measure_every == 0 or step == args.steps - 1)
        if probe is not None:
            probe.armed = measure
        start = time.perf_counter()
        loss = engine(*batch).loss
        scale = ds_adapter.loss_scale(engine)  # None unless fp16; read before the step may change it
        if method == "ds-fp16":
            ds_adapter.backward(engine, loss * args.loss_mult)  # applies the loss scale at ZeRO-0
        else:
            engine.backward(loss * args.loss_mult)
        elapsed = time.perf_counter() - start
        if measure:
            weights = {n: p.detach() for n, p in engine.module.named_parameters()}
            ref = reference_grads(ref_model, weights, batch, args.loss_mult)
            grads = {}
            for n, p in engine.module.named_parameters():
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                grads[n] = g.float() / scale if scale is not None else g.float()
            res.measures[step] = compare(grads, ref, probe.take() if probe is not None else {})
        start = time.perf_counter()
        if method == "resblock":
            skip = scaler.check()
            with contextlib.ExitStack() as stack:
                for opt in ds_adapter.inner_optimizers(engine):
                    stack.enter_context(skipping_step(opt, skip))
                engine.step()
            scaler.update()
            res.scales.append(scaler.stats())
        else:
            before = ds_adapter.skipped_steps(engine)
            engine.step()
            skip = ds_adapter.skipped_steps(engine) > before
            if scale is not None:
                res.scales.append(scale)
        elapsed += time.perf_counter() - start
        res.losses.append(loss.item())
        res.skipped.append(bool(skip))
        res.step_seconds.append(elapsed)
        if not math.isfinite(loss.item()):
            res.note = f"loss non-finite at step {step}"
            log(f"  {method}: {res.note}; stopping this run")
            break
        if measure:
            b = list(blocks_only(res.measures[step]).values())
            log(
                f"  {method:8s} step {step:4d} loss {loss.item():.4f} scale {scale_text(res.scales[-1])} | "
                f"min cos {min(s.cos for s in b):.6f} max flush {max(s.flush for s in b):.2e} "
                f"(mass {max(s.flush_mass for s in b):.1e}) max overflow {max(s.overflow for s in b):.1e}"
            )
    if scaler is not None:
        res.final_scales = dict(scaler.scales)
        scaler.remove()
    if method == "fp32":
        res.final_weights = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
    return res


def scale_text(value) -> str:
    if isinstance(value, dict):
        lo, hi = math.log2(value["grad_scale_min"]), math.log2(value["grad_scale_max"])
        return f"2^{lo:.2f}" if abs(hi - lo) < 0.005 else f"2^{lo:.2f}..2^{hi:.2f}"
    return f"2^{math.log2(value):.0f}" if value and value > 0 else str(value)


# --- the scale scan -------------------------------------------------------------------------------


def scan_powers(args) -> list[int]:
    if args.scan_powers:
        a, b, s = (int(x) for x in args.scan_powers.split(":"))
        return list(range(a, b, s))
    base = round(-math.log2(args.loss_mult))
    return list(range(base - 4, base + 37, 3))


def scale_scan(
    weights: dict[str, torch.Tensor], config: DalleConfig, batch, args, device: torch.device
) -> dict[str, dict[int, dict]]:
    """Per scheme ("all-fp16", "amp"), per power k: per-segment stats of one backward at the static scale 2^k."""
    powers = scan_powers(args)
    batch = tuple(t.to(device) for t in batch)
    out: dict[str, dict[int, dict]] = {"all-fp16": {}, "amp": {}}
    # all-fp16: DeepSpeed's fp16 engine computes exactly this (module.half(), loss * scale, backward)
    rounded = {n: w.half().float() for n, w in weights.items()}
    ref = reference_grads(DALLE(config).to(device), rounded, batch, args.loss_mult)
    half = DALLE(config).to(device)
    load_weights(half, weights)
    half.half()
    for k in powers:
        half.zero_grad(set_to_none=True)
        (half(*batch).loss.float() * args.loss_mult * 2.0**k).backward()
        out["all-fp16"][k] = compare({n: p.grad.float() / 2.0**k for n, p in half.named_parameters()}, ref, {})
    # amp: the per-resblock machinery, every branch at 2^k (rest: fp32, unscaled)
    ref = reference_grads(DALLE(config).to(device), weights, batch, args.loss_mult)
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
        (amp(*batch).loss * args.loss_mult).backward()
        out["amp"][k] = compare({n: p.grad for n, p in amp.named_parameters()}, ref, probe.take())
    scaler.remove()
    return out


def usable(stats: dict[str, SegStat], whole: bool) -> bool:
    """Every block cos >= GOAL_COS and no overflow (whole: anywhere, incl. rest, as one scale skips the step)."""
    segs = stats if whole else blocks_only(stats)
    return all(s.cos >= GOAL_COS and s.overflow == 0 for s in segs.values())


def ranges(powers: list[int]) -> str:
    if not powers:
        return "none"
    out, start, prev = [], powers[0], powers[0]
    step = min((b - a for a, b in zip(powers, powers[1:], strict=False)), default=1)
    for p in powers[1:] + [None]:
        if p is None or p - prev != step:
            out.append(f"2^{start}" if start == prev else f"2^{start}..2^{prev}")
            if p is not None:
                start = p
        if p is not None:
            prev = p
    return ", ".join(out)


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


def scan_table(scan: dict[str, dict[int, dict]]) -> list[str]:
    lines = [
        "| scale | all-fp16: min block cos | blocks < 0.999 | overflow (share, all params) | max flush mass | "
        "amp: min block cos | blocks < 0.999 | blocks overflowed | max flush mass |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k in sorted(scan["amp"]):
        cells = [f"2^{k}"]
        for scheme in ("all-fp16", "amp"):
            st = scan[scheme][k]
            b = blocks_only(st)
            cos = [s.cos for s in b.values()]
            cells += [f"{min(cos):.6f}", f"{sum(c < GOAL_COS for c in cos)}/{len(cos)}"]
            if scheme == "all-fp16":
                cells.append(pct(statistics.fmean(s.overflow for s in st.values())))
            else:
                cells.append(f"{sum(s.overflow > 0 for s in b.values())}")
            cells.append(f"{max(s.flush_mass for s in b.values()):.1e}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --- reporting ------------------------------------------------------------------------------------


def worst_over_steps(res: RunResult) -> dict[str, SegStat]:
    """Per segment, the worst value of each statistic over the measured steps whose update was applied (a
    skipped update's gradient never reaches the weights; all measured steps when every one was skipped);
    overflow over all measured steps. Norm ratio: the one farthest from 1."""
    applied = [k for k in res.measures if k < len(res.skipped) and not res.skipped[k]] or list(res.measures)
    out: dict[str, SegStat] = {}
    for step in applied:
        for seg, s in res.measures[step].items():
            cur = out.get(seg)
            if cur is None:
                out[seg] = dataclasses.replace(s)
                continue
            cur.cos = min(cur.cos, s.cos)
            cur.flush = max(cur.flush, s.flush)
            cur.flush_mass = max(cur.flush_mass, s.flush_mass)
            cur.overflow = max(cur.overflow, s.overflow)
            if abs(math.log(max(s.norm_ratio, 1e-30))) > abs(math.log(max(cur.norm_ratio, 1e-30))):
                cur.norm_ratio = s.norm_ratio
    for stats in res.measures.values():
        for seg, s in stats.items():
            out[seg].overflow = max(out[seg].overflow, s.overflow)
    return out


def pct(x: float) -> str:
    if x == 0:
        return "0"
    return f"{100 * x:.3g}%" if x >= 1e-4 else f"{100 * x:.1e}%"


def block_table(results: dict[str, RunResult], order: list[str], all_blocks: bool) -> list[str]:
    worst = {m: worst_over_steps(results[m]) for m in FP16_METHODS}
    if not all(worst.values()):
        return ["(no measurements)"]
    blocks = [s for s in order if s != "rest"]
    worst_cos = {m: min(blocks, key=lambda s, m=m: worst[m][s].cos) for m in FP16_METHODS}
    worst_mass = {m: max(blocks, key=lambda s, m=m: worst[m][s].flush_mass) for m in FP16_METHODS}
    worst_flush = {m: max(blocks, key=lambda s, m=m: worst[m][s].flush) for m in FP16_METHODS}
    if all_blocks:
        chosen = order
    else:
        n = len(blocks)
        picks = {0, 1, n // 2 - 1, n // 2, n - 2, n - 1}
        picks |= {blocks.index(s) for s in (*worst_cos.values(), *worst_mass.values(), *worst_flush.values())}
        chosen = [blocks[i] for i in sorted(p for p in picks if 0 <= p < n)] + ["rest"]
    scales = results["resblock"].final_scales
    lines = [
        "| res block | ds-fp16 cos | flush | mass | overflow | resblock cos | flush | mass | overflow | "
        "resblock scale |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for seg in chosen:
        tags = [f"worst {m} cos" for m in FP16_METHODS if worst_cos[m] == seg]
        tags += [f"worst {m} mass" for m in FP16_METHODS if worst_mass[m] == seg and worst[m][seg].flush_mass > 0]
        tags += [f"worst {m} flush" for m in FP16_METHODS if worst_flush[m] == seg and worst[m][seg].flush > 0]
        label = seg + (f" ({', '.join(tags)})" if tags else "")
        cells = []
        for m in FP16_METHODS:
            s = worst[m][seg]
            cells += [f"{s.cos:.6f}", pct(s.flush), f"{s.flush_mass:.1e}", pct(s.overflow)]
        scale = f"2^{math.log2(scales[seg]):.2f}" if seg in scales else "fp32, unscaled"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {scale} |")
    return lines


def summary(results: dict[str, RunResult], args) -> dict[str, dict]:
    base = results["fp32"]
    k = max(1, min(args.measure_every, len(base.losses)))
    base_loss = statistics.fmean(base.losses[-k:])
    base_time = statistics.median(base.step_seconds[1:] or base.step_seconds)
    out = {}
    for m, res in results.items():
        loss = statistics.fmean(res.losses[-k:]) if len(res.losses) >= k else float("nan")
        t = statistics.median(res.step_seconds[1:] or res.step_seconds)
        row = {
            "first_loss": statistics.fmean(res.losses[:k]),
            "final_loss": loss,
            "loss_vs_fp32": loss / base_loss,
            "s_per_step": t,
            "time_vs_fp32": t / base_time,
            "skipped": sum(res.skipped),
            "steps": len(res.losses),
            "note": res.note,
        }
        if res.measures:
            worst = worst_over_steps(res)
            blocks = blocks_only(worst)
            row.update(
                min_block_cos=min(v.cos for v in blocks.values()),
                worst_cos_block=min(blocks, key=lambda s: blocks[s].cos),
                blocks_below_goal=sum(v.cos < GOAL_COS for v in blocks.values()),
                blocks=len(blocks),
                max_block_flush=max(v.flush for v in blocks.values()),
                max_block_flush_mass=max(v.flush_mass for v in blocks.values()),
                max_block_overflow=max(v.overflow for v in blocks.values()),
                rest_cos=worst["rest"].cos,
            )
        if m == "ds-fp16" and res.scales:
            row["scale"] = f"2^{math.log2(res.scales[0]):.0f} -> 2^{math.log2(res.scales[-1]):.0f}"
        if m == "resblock" and res.final_scales:
            v = sorted(res.final_scales.values())
            row["scale"] = (
                f"2^{math.log2(v[0]):.2f} / 2^{math.log2(statistics.median(v)):.2f} / 2^{math.log2(v[-1]):.2f}"
            )
        out[m] = row
    return out


def loss_curve_table(results: dict[str, RunResult], every: int) -> list[str]:
    lines = ["| steps | " + " | ".join(f"{m} loss" for m in METHODS) + " |", "|---" * (len(METHODS) + 1) + "|"]
    n = max(len(r.losses) for r in results.values())
    for start in range(0, n, every):
        cells = []
        for m in METHODS:
            chunk = results[m].losses[start : start + every]
            cells.append(f"{statistics.fmean(chunk):.4f}" if chunk else "-")
        lines.append(f"| {start}-{min(start + every, n) - 1} | " + " | ".join(cells) + " |")
    return lines


def summary_table(rows: dict[str, dict]) -> list[str]:
    lines = [
        "| method | loss first → last window | vs fp32 | min block cos | blocks cos < 0.999 | max block flush "
        "(mass) | max block overflow | skipped steps | loss scale (ds: start → end; resblock: min / median / max) "
        "| s/step | time vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in rows.items():
        if "min_block_cos" in r:
            grad = (
                f"{r['min_block_cos']:.6f} | {r['blocks_below_goal']}/{r['blocks']} | {pct(r['max_block_flush'])} "
                f"({r['max_block_flush_mass']:.1e}) | {pct(r['max_block_overflow'])}"
            )
        else:
            grad = "(reference) | - | - | -"
        lines.append(
            f"| {m} | {r['first_loss']:.3f} → {r['final_loss']:.3f} | {r['loss_vs_fp32']:.3f} | {grad} | "
            f"{r['skipped']}/{r['steps']} | {r.get('scale', '-')} | {r['s_per_step']:.2f} | {r['time_vs_fp32']:.1f}x |"
        )
    return lines


def some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def bound(ss: dict, k: int) -> str:
    """2^k, marked when it is the edge of the scanned range (the true bound may lie beyond)."""
    return f"<=2^{k}" if k == ss["powers"][0] else f">=2^{k}" if k == ss["powers"][-1] else f"2^{k}"


def scan_lines(ss: dict) -> list[str]:
    floor, ceil = ss["amp_highest_floor"], ss["amp_lowest_ceiling"]
    inter = ss["amp_windows_intersection"]
    return [
        f"usable single scales (every block cos >= {GOAL_COS}, no overflow): all-fp16 (DeepSpeed's scheme): "
        f"{ranges(ss['all_fp16_usable'])}; amp with one scale for every branch: {ranges(ss['amp_uniform_usable'])}",
        f"amp per-block usable ranges: highest floor {bound(ss, floor[0])} ({some(ss['floor_blocks'])}), lowest "
        f"ceiling {bound(ss, ceil[1])} ({some(ss['ceiling_blocks'])}); "
        f"intersection {f'2^{inter[0]}..2^{inter[1]}' if inter else 'EMPTY: no single scale serves every block'}; "
        f"blocks with no usable scale at all: {ss['blocks_without_window'] or 'none'}"
        if floor
        else "amp: no block has a usable scale",
        f"amp per-block floors seen: {', '.join(bound(ss, k) for k in ss['floors'])}; "
        f"ceilings seen: {', '.join(bound(ss, k) for k in ss['ceilings'])}",
    ]


# --- main -----------------------------------------------------------------------------------------


def bench(args, log) -> dict:
    config = make_config(args)
    torch.manual_seed(args.seed)
    init = DALLE(config)
    n_params = sum(p.numel() for p in init.parameters())
    log(
        f"model: dalle-tiny, n_layers={config.n_layers} d_model={config.d_model} n_heads={config.n_heads} "
        f"seq_len={config.seq_len} init_std={config.init_std} ({n_params / 1e6:.2f}M params); batch {args.batch}, "
        f"{args.steps} steps, AdamW lr {args.lr}, loss x {args.loss_mult:g}; measured every {args.measure_every} steps"
    )
    results = {}
    for method in ("fp32",) if args.scan_only else METHODS:
        log(f"run {method} ...")
        start = time.perf_counter()
        torch.manual_seed(args.seed + 1)
        results[method] = train(method, init, args, config, log)
        log(f"  {method}: {time.perf_counter() - start:.0f} s")
    out = {"config": config, "results": results, "rows": {} if args.scan_only else summary(results, args)}
    if args.scan or args.scan_only:
        log("scale scan at the fp32 run's final weights ...")
        start = time.perf_counter()
        batch = make_batch(args.steps - 1, args, config)
        device = results["fp32"].final_weights["ln_f.weight"].device
        out["scan"] = scale_scan(results["fp32"].final_weights, config, batch, args, device)
        out["scan_summary"] = scan_summary(out["scan"])
        log(f"  scan: {time.perf_counter() - start:.0f} s")
    return out


def print_report(out: dict, args, log) -> None:
    results, rows = out["results"], out["rows"]
    if args.scan_only:
        losses = results["fp32"].losses
        log(f"\nfp32 loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} steps")
        log("\n## Scale scan at the fp32 run's final weights (one backward per static scale)\n")
        for line in [*scan_table(out["scan"]), "", *scan_lines(out["scan_summary"])]:
            log(line)
        return
    log("\n## Per res block (worst over the measured steps whose update was applied; overflow: all measured)\n")
    for line in block_table(results, segment_order(out["config"]), args.all_blocks):
        log(line)
    log("\n## Loss curves (mean over each window of steps)\n")
    for line in loss_curve_table(results, args.measure_every):
        log(line)
    ds = results["ds-fp16"]
    skipped_at = [i for i, s in enumerate(ds.skipped) if s]
    log(
        f"\nds-fp16: loss scale {scale_text(ds.scales[0])} at the start, {scale_text(ds.scales[-1])} at the end; "
        f"skipped steps {len(skipped_at)}{f' at {skipped_at[:20]}' if skipped_at else ''}"
    )
    st = results["resblock"].scales[-1]
    log(
        f"resblock: scales min 2^{math.log2(st['grad_scale_min']):.3f} median "
        f"2^{math.log2(st['grad_scale_median']):.3f} max 2^{math.log2(st['grad_scale_max']):.3f}; "
        f"skipped updates {st['grad_scale_skipped']} of {st['grad_scale_updates']}"
    )
    if "scan" in out:
        log("\n## Scale scan at the fp32 run's final weights (one backward per static scale)\n")
        for line in scan_table(out["scan"]):
            log(line)
        log("")
        for line in scan_lines(out["scan_summary"]):
            log(line)
    log("\n## Summary (paste into README)\n")
    for line in summary_table(rows):
        log(line)
    for m in FP16_METHODS:
        r = rows[m]
        met = r["min_block_cos"] >= GOAL_COS and r["max_block_flush_mass"] < 1e-3
        log(
            f"goal (every block cos >= {GOAL_COS}, flushed mass < 1e-3) for {m}: {'met' if met else 'NOT met'} "
            f"(min cos {r['min_block_cos']:.6f} in {r['worst_cos_block']}, max flush {pct(r['max_block_flush'])} "
            f"of entries carrying {r['max_block_flush_mass']:.1e} of the norm)"
        )


SWEEP = [
    ("default", {}),
    ("init_std 0.002", {"init_std": 0.002}),
    ("loss x 1e-4", {"loss_mult": 1e-4}),
    ("loss x 1e-6", {"loss_mult": 1e-6}),
    ("loss x 1e-6, ds from 2^32", {"loss_mult": 1e-6, "ds_scale_power": 32, "ds_hysteresis": 1}),
    ("loss x 1, ds from 2^32", {"ds_scale_power": 32, "ds_hysteresis": 1}),
]


def sweep(args, log) -> list[tuple[str, dict]]:
    table = []
    for label, changes in SWEEP:
        sub = argparse.Namespace(**{**vars(args), **changes})
        log(f"\n### sweep: {label}")
        out = bench(sub, log)
        table.append((label, {"rows": out["rows"], "scan": out.get("scan_summary")}))
    log("\n## Sweep summary (paste into README)\n")
    log(
        "| setting | method | min block cos | blocks < 0.999 | max flush (mass) | max overflow | skipped | "
        "scale(s) at the end | loss vs fp32 | scan: usable single scales | scan: amp per-block floor..ceiling |"
    )
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, res in table:
        rows, ss = res["rows"], res["scan"]
        for m in FP16_METHODS:
            r = rows[m]
            if ss is None:
                scan_cells = "- | -"
            elif m == "ds-fp16":
                scan_cells = f"all-fp16: {ranges(ss['all_fp16_usable'])} | -"
            else:
                inter = ss["amp_windows_intersection"]
                floor, ceil = ss["amp_highest_floor"], ss["amp_lowest_ceiling"]
                scan_cells = (
                    f"amp: {ranges(ss['amp_uniform_usable'])} | "
                    + (f"{bound(ss, floor[0])} .. {bound(ss, ceil[1])}" if floor else "none")
                    + ("" if inter else " (empty)")
                )
            log(
                f"| {label} | {m} | {r['min_block_cos']:.6f} | {r['blocks_below_goal']}/{r['blocks']} | "
                f"{pct(r['max_block_flush'])} ({r['max_block_flush_mass']:.1e}) | {pct(r['max_block_overflow'])} | "
                f"{r['skipped']}/{r['steps']} | {r.get('scale', '-')} | {r['loss_vs_fp32']:.3f} | {scan_cells} |"
            )
    return table


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=48)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--image-grid", type=int, default=8, help="image tokens per side (dalle-tiny: 8, seq 16 + 64)")
    p.add_argument("--init-std", type=float, default=0.02, help="DalleConfig.init_std")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--measure-every", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--loss-mult", type=float, default=1.0, help="multiply the loss before backward (all runs)")
    p.add_argument("--ds-scale-power", type=int, default=16, help="DeepSpeed fp16 initial_scale_power")
    p.add_argument("--ds-window", type=int, default=1000, help="DeepSpeed fp16 loss_scale_window")
    p.add_argument("--ds-hysteresis", type=int, default=2, help="DeepSpeed fp16 hysteresis")
    p.add_argument("--resblock-scale-power", type=float, default=13, help="per-resblock initial_scale_power")
    p.add_argument("--no-scan", dest="scan", action="store_false", help="skip the static scale scan")
    p.add_argument("--scan-only", action="store_true", help="train the fp32 run only, then scan (cheap)")
    p.add_argument("--scan-powers", help="A:B:S: scan 2^A .. 2^(B-1) in steps of S (default: around 1/loss-mult)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise on a shared machine)")
    p.add_argument("--all-blocks", action="store_true", help="every res block in the table")
    p.add_argument("--quick", action="store_true", help="toy size: 6 layers, d_model 32, batch 2, 6 steps")
    p.add_argument("--sweep", action="store_true", help="run the settings in SWEEP and print one summary table")
    p.add_argument("--json", help="write the summary rows (and the scan summary) here")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.d_model, args.heads, args.batch = 6, 32, 2, 2
        args.steps, args.measure_every = 6, 3
        args.scan_powers = args.scan_powers or "0:41:8"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)

    def log(msg: str) -> None:
        print(msg, flush=True)

    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    init_process_group()
    patched = allow_fp16_on_cpu()
    log(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, {torch.get_num_threads()} thread(s)")
    if patched:
        log(
            "NOTE: DeepSpeed's CPU accelerator reports fp16 as unsupported; this script patches that one check "
            "(CPU_Accelerator.is_fp16_supported -> True), as tests/launch_env/sitecustomize.py does under "
            "DALLE_DS_TEST_FP16_ON_CPU=1. The fp16 arithmetic itself runs on the CPU."
        )
    if args.sweep:
        payload = dict(sweep(args, log))
    else:
        out = bench(args, log)
        print_report(out, args, log)
        payload = {"rows": out["rows"], "scan": out.get("scan_summary")}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
