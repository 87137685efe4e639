"""throughput/<preset>: the DALL-E trainer itself (``DalleTrainer`` on a run config, through DeepSpeed, one
rank in this process) for a few warm-up and timed steps of a preset on synthetic codes made in-process.
Reports the trainer's own tokens/s (its metrics.jsonl), ms/step, achieved TFLOP/s and model FLOPs
utilisation against the GPU's peak (:mod:`.flops`), and the peak GPU memory next to what the dry run
(:func:`dalle_ds.planning.plan.plan_run`) predicts for the same run, which also chooses the micro batch."""

from __future__ import annotations

import json
import os
import shutil
import statistics

from . import ROOT
from .context import CheckFailed, Ctx, finite
from .flops import FLOPS_FORMULA, model_flops, peak_bf16

__all__ = ["GPU_RUN", "MEMORY_SHARE", "SMOKE_RUN", "choose_micro_batch", "worker_throughput"]

# (ds_configs/<name>.json, steps per metrics record (--log-every), timed records after the warm-up
# record, micro batches the dry run picks from, largest first). The trainer reads its device values
# to the host only at a record and times each record's interval: the first interval is the warm-up,
# the others are timed. On a GPU: bf16 ZeRO-2 with activation checkpointing, as a one-GPU training
# run uses it; the largest candidate bounds the check's time (dalle-1.3b at 16: 33.8 GiB predicted).
GPU_RUN = ("zero2_bf16", 3, 2, (16, 8, 4, 2, 1))
SMOKE_RUN = ("cpu_zero2_fp32", 2, 2, (2,))  # --cpu-smoke: fp32 (bf16 is 3-10x slower on AVX2 CPUs)
MEMORY_SHARE = 0.85  # the dry run's total must fit in this share of the device's memory


def choose_micro_batch(config, ds_config: dict, candidates, memory: int, *, preset: str, dvae, device_type: str):
    """The first of ``candidates`` whose dry-run total (one rank, no accumulation, the frozen ``dvae``
    on the device) fits in ``MEMORY_SHARE`` of ``memory`` bytes: (micro batch, its plan)."""
    from dalle_ds.planning.layout import Layout
    from dalle_ds.planning.plan import plan_run

    tried = []
    for micro in candidates:
        plan = plan_run(config, ds_config, Layout(1, 1, memory, micro, 1), preset=preset, dvae=dvae,
                        device_type=device_type)  # fmt: skip
        if plan.total_bytes <= MEMORY_SHARE * memory:
            return micro, plan
        tried.append(f"micro batch {micro}: {plan.total_bytes / 2**30:.1f} GiB")
    raise CheckFailed(
        f"the dry run fits no micro batch in {MEMORY_SHARE:.0%} of {memory / 2**30:.1f} GiB: " + "; ".join(tried),
        {"preset": preset, "tried": tried},
    )


def _device(ctx: Ctx) -> tuple[str, int]:
    """(device name, memory in bytes): the GPU's, or on the CPU the host's."""
    if ctx.device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        return props.name, props.total_memory
    return "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _train(cfg, cuda: bool) -> int | None:
    """Run the trainer on ``cfg`` in a one-rank process group (created here unless one exists; the
    worker process tears it down); the peak GPU memory of its steps (None on the CPU)."""
    import torch

    from dalle_ds.distributed import ds_adapter
    from dalle_ds.distributed.process_group import backend_for
    from dalle_ds.distributed.single_process import init_single_process_group

    from .fixed_batch_trainer import FixedBatchTrainer

    init_single_process_group(backend_for(*ds_adapter.accelerator()))
    trainer = FixedBatchTrainer(cfg)
    if cuda:  # the steps' peak: model states are allocated by now, activations and Adam states follow
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    trainer.run()
    return torch.cuda.max_memory_allocated() if cuda else None


def worker_throughput(ctx: Ctx, p: dict) -> tuple[str, dict]:
    import torch

    from dalle_ds import DiscreteVAE, get_preset, save_config, save_model
    from dalle_ds.training import DalleRunConfig, parse_run_config

    preset, cuda = p["preset"], ctx.device == "cuda"
    impl, compiled = p.get("attention_impl", "auto"), p.get("compile", False)
    config, dvae = get_preset(preset), get_preset(p["dvae"])
    config = config.replace(attention_impl=impl)
    ds_name, every, timed_records, candidates = GPU_RUN if cuda else SMOKE_RUN
    steps = every * (1 + timed_records)
    ds_path = ROOT / "ds_configs" / f"{ds_name}.json"
    name, memory = _device(ctx)
    micro, plan = choose_micro_batch(config, json.loads(ds_path.read_text()), candidates, memory, preset=preset,
                                     dvae=dvae, device_type=ctx.device)  # fmt: skip
    predicted = plan.total_bytes
    # max_memory_allocated never sees the CUDA context, which the plan holds as an estimate.
    predicted_allocated = predicted - plan.components["cuda_context"]
    ctx.say(
        f"{preset} (attention_impl {impl}{', compiled blocks' if compiled else ''}) on {name}: "
        f"ds_configs/{ds_name}.json, micro batch {micro} (dry run: {predicted / 2**30:.1f} GiB of "
        f"{memory / 2**30:.1f}), {every} warm-up + {steps - every} timed steps"
    )

    out = ctx.work / "runs" / f"throughput_{preset}_{impl}{'_compile' if compiled else ''}"
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    dvae_dir = save_model(DiscreteVAE(dvae), out / "dvae_random")
    model_yaml = out / f"{preset}.yaml"  # the preset with this check's attention_impl
    save_config(config, model_yaml)
    args = ["--deepspeed_config", ds_path, "--preset", model_yaml, "--dvae", dvae_dir, "--output-dir", out / "run",
            "--steps", steps, "--log-every", every, "--micro-batch-size", micro, "--grad-accum", 1,
            "--warmup-steps", 1, "--bpe-dropout", 0, "--no-progress"]  # fmt: skip
    if compiled:
        args.append("--compile")
    cfg = parse_run_config(DalleRunConfig, [str(a) for a in args])
    try:
        peak_mem = _train(cfg, cuda)
    except torch.OutOfMemoryError as err:
        raise CheckFailed(
            f"micro batch {micro} ran out of GPU memory although the dry run predicted {predicted / 2**30:.1f} GiB "
            f"of {memory / 2**30:.1f}: {err}",
            {"preset": preset, "micro_batch": micro, "predicted_total_bytes": predicted},
        ) from None

    metrics = out / "run" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    losses = [r.get("loss") for r in rows]  # at the logged steps
    if len(rows) != 1 + timed_records or not finite(losses):
        raise CheckFailed(
            f"{metrics}: {len(rows)} records (expected {1 + timed_records}), losses {losses}",
            {"preset": preset, "micro_batch": micro, "losses": losses},
        )
    timed = rows[1:]  # each record: tokens/s over the steps since the previous one
    tokens = micro * config.seq_len
    secs = statistics.mean(tokens / r["tokens_per_s"] for r in timed)  # equal intervals: mean step time
    tokens_per_s = tokens / secs
    flops = model_flops(config, micro)
    achieved = flops["total"] / secs
    peak, source = peak_bf16(name)
    details = {
        "preset": preset,
        "attention_impl": impl,
        "compile": compiled,
        "device_name": name,
        "ds_config": f"ds_configs/{ds_name}.json",
        "precision": plan.engine.precision,
        "zero_stage": plan.engine.stage,
        "activation_checkpointing": plan.engine.checkpointing,
        "micro_batch": micro,
        "micro_batch_choice": f"largest of {list(candidates)} whose dry-run total fits in {MEMORY_SHARE:.0%} of "
        f"{memory / 2**30:.1f} GiB",
        "warmup_steps": every,
        "timed_steps": every * len(timed),
        "metrics": str(metrics),
        "losses": losses,
        "tokens_per_step": tokens,
        "tokens_per_s": round(tokens_per_s, 1),
        "step_ms": round(secs * 1000, 2),
        "formula": FLOPS_FORMULA,
        "params": flops["params"],
        "matmul_params": flops["matmul_params"],
        "flops_per_step": flops["total"],
        "flops_matmul_per_step": flops["matmul"],
        "flops_attention_per_step": flops["attention"],
        "achieved_tflops": round(achieved / 1e12, 3),
        "peak_bf16_flops": peak,
        "peak_source": source,
        "mfu": round(achieved / peak, 4) if peak else None,
        "peak_memory_bytes": peak_mem,
        "predicted_total_bytes": predicted,
        "predicted_components": dict(plan.components),
        "predicted_allocated_bytes": predicted_allocated,
        "memory_measured_over_predicted": round(peak_mem / predicted_allocated, 3) if peak_mem else None,
    }
    mfu = f"MFU {100 * achieved / peak:.1f}% of {peak / 1e12:.0f} TFLOP/s" if peak else "unknown peak: MFU skipped"
    mem = (
        f", peak mem {peak_mem / 2**30:.1f} GiB vs dry run {predicted_allocated / 2**30:.1f} GiB "
        f"(x{details['memory_measured_over_predicted']})"
        if peak_mem
        else f", dry run {predicted / 2**30:.2f} GiB"
    )
    details["summary"] = (
        f"{flops['params']:,} params, attention {impl}{' compiled' if compiled else ''}, "
        f"{plan.engine.precision} ZeRO-{plan.engine.stage}, micro batch "
        f"{micro}: {tokens_per_s:,.0f} tokens/s, {secs * 1000:.0f} ms/step, {achieved / 1e12:.1f} TFLOP/s, {mfu}{mem}"
    )
    ctx.say("  " + details["summary"])
    ctx.say("  " + FLOPS_FORMULA)
    ctx.say(f"  per step: matmul {flops['matmul']:.4e} + attention {flops['attention']:.4e} FLOPs")
    return "PASS", details
