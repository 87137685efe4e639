"""Helpers for tests that train under the real `deepspeed` launcher (2 CPU ranks, gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, free_port

from dalle_ds.training.faults import ENV as FAULTS_ENV

STEPS = 6
LAUNCH_ENV = ROOT / "tests" / "launch_env"  # sitecustomize: fp16 on CPU, collective recording


def deepspeed_cmd(script: str, *args, nprocs: int = 2) -> list[str]:
    launcher = Path(sys.executable).with_name("deepspeed")
    return [
        sys.executable,
        str(launcher),
        "--num_gpus",
        str(nprocs),
        "--master_port",
        str(free_port()),
        str(ROOT / "scripts" / script),
        *map(str, args),
    ]


def shm_segments() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_*")} if shm.is_dir() else set()


def launch(script, *args, nprocs=2, timeout=300, fp16_on_cpu=False, record=None, faults=None):
    """Run ``scripts/<script>`` under the launcher. ``fp16_on_cpu``: patch DeepSpeed's fp16 capability
    check in every rank (the arithmetic runs on this CPU); ``record``: a folder that receives each
    rank's torch.distributed calls made from dalle_ds (tests/launch_env/collective_recorder.py);
    ``faults``: what the trainer's test-only fault seam injects (``dalle_ds/training/faults.py``),
    e.g. ``{"kill_after_step": 5}``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop(FAULTS_ENV, None)
    if faults:
        env[FAULTS_ENV] = json.dumps(faults)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LAUNCH_ENV), env.get("PYTHONPATH")]))
    if fp16_on_cpu:
        env["DALLE_DS_TEST_FP16_ON_CPU"] = "1"
    if record is not None:
        Path(record).mkdir(parents=True, exist_ok=True)
        env["DALLE_DS_TEST_RECORD_COLLECTIVES"] = str(record)
    before = shm_segments()
    proc = subprocess.run(
        deepspeed_cmd(script, *args, nprocs=nprocs), capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )
    # DeepSpeed's CPU shm all-reduce op never unlinks its segments; init_distributed skips it.
    leaked = shm_segments() - before
    assert not leaked, f"/dev/shm segments left behind by the run: {sorted(leaked)}"
    return proc


def ds_config(tmp: Path, stage: int, **extra) -> Path:
    base = json.loads((ROOT / "ds_configs" / "cpu_zero2_fp32.json").read_text())
    base["zero_optimization"] = {"stage": stage, **({"reduce_scatter": True} if stage in (1, 2) else {}), **extra}
    base.pop("csv_monitor", None)
    path = tmp / f"ds_stage{stage}{'_offload' if extra else ''}.json"
    path.write_text(json.dumps(base))
    return path


def shipped_config(tmp: Path, name: str, **changes) -> Path:
    """``ds_configs/<name>.json`` as shipped, with top-level sections updated by ``changes`` (a dict
    value is merged into the section) and the CSV monitor off; written under ``tmp``."""
    cfg = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    cfg.pop("csv_monitor", None)
    for key, value in changes.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    suffix = "_" + "_".join(sorted(changes)) if changes else ""
    path = tmp / f"{name}{suffix}.json"
    path.write_text(json.dumps(cfg))
    return path


def train_args(dvae_dir, out, config, *extra):
    """DALL-E trainer arguments of the tests: the trainer's defaults (BPE dropout 0.1 included)."""
    return [
        "--deepspeed_config",
        config,
        "--preset",
        "dalle-tiny",
        "--dvae",
        dvae_dir,
        "--output-dir",
        out,
        "--steps",
        STEPS,
        "--micro-batch-size",
        2,
        "--lr",
        3e-3,
        "--warmup-steps",
        1,
        "--save-every",
        2,
        "--no-progress",
        "--data-size",
        64,
        *extra,
    ]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in metrics(out)]


def crash_and_resume(script, args, faults, check_crashed=lambda out: None, **launch_kw):
    """Run until the injected failure (``faults``, see :func:`launch`) kills a rank, check the wreck,
    relaunch with --resume (with the same faults but the kill)."""
    out = Path(args[args.index("--output-dir") + 1])
    crashed = launch(script, *args, faults=faults, **launch_kw)
    assert crashed.returncode != 0
    check_crashed(out)
    again = {k: v for k, v in faults.items() if not k.startswith("kill_")}
    resumed = launch(script, *args, "--resume", faults=again, **launch_kw)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return resumed
