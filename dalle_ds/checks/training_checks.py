"""train/<trainer>/<config>: a trainer script through the real ``deepspeed`` launcher for a few steps,
then its metrics, checkpoints and exported ``final`` are checked."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics

from dalle_ds.distributed.launcher import deepspeed_command

from . import ROOT
from .checks import SAVE_EVERY, TRAIN_STEPS, TRAIN_TIMEOUT
from .context import CheckFailed, Ctx, finite
from .procs import run_logged, tail

__all__ = ["worker_train"]


def worker_train(ctx: Ctx, p: dict) -> tuple[str, dict]:
    import torch

    from dalle_ds import DiscreteVAE, get_preset, load_model, save_model
    from dalle_ds.inference.generation import load_pipeline

    trainer, config, preset = p["trainer"], p["config"], p["preset"]
    out = ctx.work / "runs" / f"{trainer}_{config}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ds_config = ROOT / "ds_configs" / f"{config}.json"
    args = [
        "--deepspeed_config",
        str(ds_config),
        "--preset",
        preset,
        "--output-dir",
        str(out / "run"),
        "--steps",
        str(TRAIN_STEPS),
        "--save-every",
        str(SAVE_EVERY),
        "--lr",
        "1e-3",
        "--data-size",
        "256",
        "--no-progress",
        "--check-sync",
    ]
    if trainer == "dalle":
        torch.manual_seed(0)
        dvae_dir = save_model(DiscreteVAE(get_preset(p["dvae"])), out / "dvae_random")
        args += ["--dvae", str(dvae_dir), "--micro-batch-size", "4", "--warmup-steps", "1", "--bpe-dropout", "0"]
    else:
        args += ["--micro-batch-size", "8"]
    cmd = deepspeed_command(ROOT / "scripts" / f"train_{trainer}.py", *args, num_gpus=1)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2", "TORCH_EXTENSIONS_DIR": str(ctx.ext_dir)}
    ctx.say("$ " + " ".join(cmd[1:]))
    log = out / "launcher.log"
    code, secs = run_logged(cmd, log, TRAIN_TIMEOUT, env)
    details = {"preset": preset, "ds_config": f"ds_configs/{config}.json", "launch_s": round(secs, 1), "log": str(log)}
    if code is None:
        details["summary"] = f"{preset}: launcher timed out"
        raise CheckFailed(f"the launcher ran past {TRAIN_TIMEOUT} s and was stopped; log tail:\n{tail(log)}", details)
    if code != 0:
        details["summary"] = f"{preset}: launcher exited {code}"
        raise CheckFailed(f"the launcher exited {code}; log tail:\n{tail(log)}", details)
    metrics = out / "run" / "metrics.jsonl"
    if not metrics.is_file():
        details["summary"] = f"{preset}: no metrics.jsonl"
        raise CheckFailed(f"{metrics} is missing; log tail:\n{tail(log)}", details)
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    losses = [r.get("loss") for r in rows]
    details.update(
        steps=len(rows),
        loss_first=losses[0] if losses else None,
        loss_last=losses[-1] if losses else None,
        loss_scale_first=rows[0].get("loss_scale") if rows else None,
        loss_scale_last=rows[-1].get("loss_scale") if rows else None,
        skipped_steps=rows[-1].get("skipped_steps") if rows else None,
        tokens_per_s_median=statistics.median(r["tokens_per_s"] for r in rows) if rows else None,
    )
    problems = []
    if len(rows) != TRAIN_STEPS:
        problems.append(f"{len(rows)} metric rows, expected {TRAIN_STEPS}")
    if not finite(losses):
        problems.append(f"non-finite losses: {losses}")
    fp16 = "fp16" in config
    if fp16 and not finite([details["loss_scale_last"]]):
        problems.append(f"fp16 run without a loss scale in the metrics ({details['loss_scale_last']})")
    if not (out / "run" / "param_sha256_rank0.txt").is_file():
        problems.append("--check-sync wrote no parameter hash")
    ckpts = sorted(d.name for d in (out / "run" / "checkpoints").glob("step*") if (d / "complete.json").exists())
    details["complete_checkpoints"] = ckpts
    if f"step{TRAIN_STEPS:08d}" not in ckpts:
        problems.append(f"no complete checkpoint of step {TRAIN_STEPS} (have {ckpts})")

    final = out / "run" / "final"
    device = torch.device(ctx.device)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        if trainer == "dvae":
            model = load_model(final).to(device)
            if not isinstance(model, DiscreteVAE):
                raise CheckFailed(f"{final} holds a {type(model).__name__}, not a DiscreteVAE", details)
            size = model.config.image_size
            x = torch.rand(2, 3, size, size, generator=g).to(device)
            codes = model.encode(x)
            recon = model.decode(codes).float()
            details["final"] = f"DiscreteVAE: encode {tuple(x.shape)} -> codes {tuple(codes.shape)} -> decode"
            if not torch.isfinite(recon).all():
                problems.append("the exported dVAE decodes to non-finite pixels")
        else:
            model, _tokenizer = load_pipeline(final)
            model = model.to(device)
            c = model.config
            text = torch.randint(0, c.text_vocab_size, (2, c.text_len), generator=g).to(device)
            codes = torch.randint(0, c.image_vocab_size, (2, c.image_len), generator=g).to(device)
            loss = model(text, image_codes=codes).loss.item()
            details["final"] = f"pipeline (DALLE + tokenizer + dVAE), forward loss {loss:.4f}"
            if not math.isfinite(loss):
                problems.append("the exported DALL-E gives a non-finite loss")
    scale = (
        (
            f", loss_scale {details['loss_scale_first']} -> {details['loss_scale_last']}, "
            f"skipped_steps {details['skipped_steps']}"
        )
        if fp16
        else f", skipped_steps {details['skipped_steps']}"
    )
    lf, ll = details["loss_first"], details["loss_last"]
    details["summary"] = (
        f"{preset}: loss {lf:.4f} -> {ll:.4f}{scale}; final loads" if finite([lf, ll]) else f"{preset}: {losses}"
    )
    if problems:
        raise CheckFailed("; ".join(problems) + f" [{details['summary']}]", details)
    return "PASS", details
