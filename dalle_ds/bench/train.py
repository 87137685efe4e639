"""Training throughput and peak memory per rank for a ZeRO stage, with or without activation
checkpointing and compiled blocks: the DALL-E trainer on 2 CPU processes under the deepspeed launcher
(``scripts/bench_train.py`` prints the table)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path

from dalle_ds import DVAEConfig
from dalle_ds.distributed.launcher import deepspeed_command

__all__ = ["compile_seconds", "launch_command", "matching_dvae_config", "metrics_summary", "run", "stage_config"]


def stage_config(base: dict, stage: int, ckpt: bool) -> dict:
    """``base`` (a DeepSpeed config) at ZeRO ``stage``, activation checkpointing on when ``ckpt``
    (not partitioned), without the CSV monitor."""
    cfg = json.loads(json.dumps(base))
    cfg["zero_optimization"] = {"stage": stage}
    cfg.pop("csv_monitor", None)
    if ckpt:
        cfg["activation_checkpointing"] = {"partition_activations": False}
    return cfg


def matching_dvae_config(config) -> DVAEConfig:
    """The smallest dVAE whose codes fit the transformer ``config`` (its grid and codebook)."""
    return DVAEConfig(
        image_size=config.image_grid * 4,
        codebook_size=config.image_vocab_size,
        n_hid=16,
        n_init=16,
        n_blk_per_group=1,
        group_count=3,
    )


def launch_command(
    train_script: Path,
    ds_config: Path,
    preset: str,
    dvae: Path,
    out: Path,
    steps: int,
    micro_batch_size: int,
    compile: bool = False,
) -> list[str]:
    """``deepspeed --num_gpus 2`` (two CPU ranks) running ``train_script`` for ``steps`` steps, its
    blocks compiled when ``compile``."""
    args = ["--deepspeed_config", ds_config, "--preset", preset, "--dvae", dvae, "--output-dir", out]
    args += ["--steps", steps, "--micro-batch-size", micro_batch_size, "--no-progress", "--bpe-dropout", "0"]
    return deepspeed_command(train_script, *args, *(["--compile"] if compile else []), num_gpus=2)


def metrics_summary(rows: list[dict]) -> tuple[float, float, float]:
    """(median tokens/s after the first two steps, the largest peak RSS in MiB of any rank, the first
    two steps' seconds per token of a step, in which a compiled run compiles its blocks) of a run's
    ``metrics.jsonl`` rows."""
    steady = statistics.median(r["tokens_per_s"] for r in rows[2:])
    return steady, max(r["peak_rss_mb"] for r in rows), sum(1 / r["tokens_per_s"] for r in rows[:2])


def compile_seconds(step_tokens: int, eager_start: float, compiled_start: float) -> float:
    """What a compiled run's first two steps took beyond the eager run's (``metrics_summary``'s third
    value of each, at ``step_tokens`` tokens per step): the compile."""
    return step_tokens * (compiled_start - eager_start)


def run(
    tmp: Path,
    name: str,
    cfg: dict,
    train_script: Path,
    preset: str,
    dvae: Path,
    steps: int,
    mbs: int,
    compile: bool = False,
):
    """One launcher run of ``cfg`` (written to ``tmp/<name>.json``, output in ``tmp/<name>``); its
    :func:`metrics_summary`. One thread per rank; a compiled run starts with an empty compile cache
    (``tmp/<name>/inductor``), so its first step pays the whole compile."""
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    out = tmp / name
    cmd = launch_command(train_script, path, preset, dvae, out, steps, mbs, compile)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if compile:
        env["TORCHINDUCTOR_CACHE_DIR"] = str(out / "inductor")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return metrics_summary([json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()])
