"""The three training runs of the benchmark (fp32, DeepSpeed fp16, per-resblock scaling), each
through an in-process DeepSpeed engine at ZeRO stage 0, and their summary rows.

The caller provides a process group (``dalle_ds.distributed.single_process.init_single_process_group``)
and, on a CPU without native fp16, ``ds_adapter.allow_fp16_on_cpu()``."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from dalle_ds import DALLE, DalleConfig
from dalle_ds.distributed import ds_adapter
from dalle_ds.training.grad_scaling import ResblockScalingConfig, install_resblock_scaling, skipping_step

from .fidelity import GOAL_COS, NonFiniteProbe, SegStat, blocks_only, compare, reference_grads
from .scan import scale_scan, scan_summary

__all__ = [
    "FP16_METHODS",
    "METHODS",
    "QUICK",
    "SWEEP",
    "GradScalingSettings",
    "RunResult",
    "bench",
    "make_batch",
    "make_config",
    "scale_text",
    "summary",
    "sweep",
    "train",
    "worst_over_steps",
]

METHODS = ("fp32", "ds-fp16", "resblock")
FP16_METHODS = ("ds-fp16", "resblock")


@dataclass
class GradScalingSettings:
    """The benchmark's knobs (the script's options of the same names)."""

    layers: int = 48
    d_model: int = 64
    heads: int = 4
    image_grid: int = 8  # image tokens per side (dalle-tiny: 8, seq 16 + 64)
    init_std: float = 0.02  # DalleConfig.init_std
    batch: int = 8
    steps: int = 60
    measure_every: int = 10
    lr: float = 1e-3
    loss_mult: float = 1.0  # multiply the loss before backward (all runs); AdamW's eps by the same
    ds_scale_power: int = 16  # DeepSpeed fp16 initial_scale_power
    ds_window: int = 1000  # DeepSpeed fp16 loss_scale_window
    ds_hysteresis: int = 2  # DeepSpeed fp16 hysteresis
    resblock_scale_power: float = 13  # per-resblock initial_scale_power
    scan: bool = True  # the static scale scan after the runs
    scan_only: bool = False  # train the fp32 run only, then scan (cheap)
    scan_powers: str | None = None  # "A:B:S": scan 2^A .. 2^(B-1) in steps of S (default: around 1/loss_mult)
    seed: int = 0


# --quick: the toy size (the test's)
QUICK = {"layers": 6, "d_model": 32, "heads": 2, "batch": 2, "steps": 6, "measure_every": 3, "scan_powers": "0:41:8"}


def make_config(settings: GradScalingSettings) -> DalleConfig:
    return DalleConfig.from_name(
        "dalle-tiny",
        n_layers=settings.layers,
        d_model=settings.d_model,
        n_heads=settings.heads,
        image_grid=settings.image_grid,
        init_std=settings.init_std,
    )


def make_batch(step: int, settings: GradScalingSettings, config: DalleConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Random text; image code j = (11 j + 37 (t mod 4)) mod V with t the first text token: a positional
    part the model learns in a few dozen steps, then two bits it must fetch from the text by attention.
    The same batch for every run at a given step."""
    g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    text = torch.randint(0, config.text_vocab_size, (settings.batch, config.text_len), generator=g)
    j = torch.arange(config.image_len)
    codes = (11 * j + 37 * (text[:, :1] % 4)) % config.image_vocab_size
    return text, codes


def ds_config(settings: GradScalingSettings, fp16: bool) -> dict:
    cfg = {
        "train_batch_size": settings.batch,
        "train_micro_batch_size_per_gpu": settings.batch,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": 0},
    }
    if fp16:
        cfg["fp16"] = {
            "enabled": True,
            "loss_scale": 0,  # dynamic
            "initial_scale_power": settings.ds_scale_power,
            "loss_scale_window": settings.ds_window,
            "hysteresis": settings.ds_hysteresis,
            "min_loss_scale": 1,
        }
    return cfg


def build_engine(model: torch.nn.Module, settings: GradScalingSettings, fp16: bool):
    opt = torch.optim.AdamW(
        model.parameters(), lr=settings.lr, betas=(0.9, 0.96), eps=1e-8 * settings.loss_mult, weight_decay=0.0
    )
    engine, _, _ = ds_adapter.build_engine(model, ds_config(settings, fp16), opt)
    return engine


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


def train(method: str, init: DALLE, settings: GradScalingSettings, config: DalleConfig, log) -> RunResult:
    model = copy.deepcopy(init)
    res = RunResult(method)
    scaler = probe = None
    if method == "resblock":
        probe = NonFiniteProbe(model)  # before the scaler's hooks
        scaler = install_resblock_scaling(
            model, ResblockScalingConfig(initial_scale_power=settings.resblock_scale_power), world_size=1
        )
    engine = build_engine(model, settings, fp16=(method == "ds-fp16"))
    ref_model = DALLE(config).to(engine.device) if method in FP16_METHODS else None
    for step in range(settings.steps):
        batch = tuple(t.to(engine.device) for t in make_batch(step, settings, config))
        measure = method in FP16_METHODS and (step % settings.measure_every == 0 or step == settings.steps - 1)
        if probe is not None:
            probe.armed = measure
        start = time.perf_counter()
        loss = engine(*batch).loss
        scale = ds_adapter.loss_scale(engine)  # None unless fp16; read before the step may change it
        if method == "ds-fp16":
            ds_adapter.backward(engine, loss * settings.loss_mult)  # applies the loss scale at ZeRO-0
        else:
            engine.backward(loss * settings.loss_mult)
        elapsed = time.perf_counter() - start
        if measure:
            weights = {n: p.detach() for n, p in engine.module.named_parameters()}
            ref = reference_grads(ref_model, weights, batch, settings.loss_mult)
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


def summary(results: dict[str, RunResult], settings: GradScalingSettings) -> dict[str, dict]:
    base = results["fp32"]
    k = max(1, min(settings.measure_every, len(base.losses)))
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


def bench(settings: GradScalingSettings, log) -> dict:
    config = make_config(settings)
    torch.manual_seed(settings.seed)
    init = DALLE(config)
    n_params = sum(p.numel() for p in init.parameters())
    log(
        f"model: dalle-tiny, n_layers={config.n_layers} d_model={config.d_model} n_heads={config.n_heads} "
        f"seq_len={config.seq_len} init_std={config.init_std} ({n_params / 1e6:.2f}M params); "
        f"batch {settings.batch}, {settings.steps} steps, AdamW lr {settings.lr}, loss x {settings.loss_mult:g}; "
        f"measured every {settings.measure_every} steps"
    )
    results = {}
    for method in ("fp32",) if settings.scan_only else METHODS:
        log(f"run {method} ...")
        start = time.perf_counter()
        torch.manual_seed(settings.seed + 1)
        results[method] = train(method, init, settings, config, log)
        log(f"  {method}: {time.perf_counter() - start:.0f} s")
    out = {"config": config, "results": results, "rows": {} if settings.scan_only else summary(results, settings)}
    if settings.scan or settings.scan_only:
        log("scale scan at the fp32 run's final weights ...")
        start = time.perf_counter()
        batch = make_batch(settings.steps - 1, settings, config)
        device = results["fp32"].final_weights["ln_f.weight"].device
        out["scan"] = scale_scan(results["fp32"].final_weights, config, batch, settings, device)
        out["scan_summary"] = scan_summary(out["scan"])
        log(f"  scan: {time.perf_counter() - start:.0f} s")
    return out


SWEEP = [
    ("default", {}),
    ("init_std 0.002", {"init_std": 0.002}),
    ("loss x 1e-4", {"loss_mult": 1e-4}),
    ("loss x 1e-6", {"loss_mult": 1e-6}),
    ("loss x 1e-6, ds from 2^32", {"loss_mult": 1e-6, "ds_scale_power": 32, "ds_hysteresis": 1}),
    ("loss x 1, ds from 2^32", {"ds_scale_power": 32, "ds_hysteresis": 1}),
]


def sweep(settings: GradScalingSettings, log) -> list[tuple[str, dict]]:
    """:func:`bench` at each of the settings in SWEEP: (label, {"rows", "scan": the scan summary}) each."""
    table = []
    for label, changes in SWEEP:
        sub = dataclasses.replace(settings, **changes)
        log(f"\n### sweep: {label}")
        out = bench(sub, log)
        table.append((label, {"rows": out["rows"], "scan": out.get("scan_summary")}))
    return table
