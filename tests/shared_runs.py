"""Training runs that several test files assert on, each made once per test session (2 ranks).

A run serves every test that can read its answer from the same outputs: e.g. the streamed
ZeRO-2 + PowerSGD run below gives the stream's exact resume (test_training), PowerSGD's traffic
and error-feedback resume, and the record of every collective (test_distributed)."""

import json
import shutil
import subprocess
from pathlib import Path

from launching import ds_config, launch, shipped_config, train_args

_done: dict[str, Path] = {}
RANK4 = {"rank": 4, "start_iter": 2, "min_compression_rate": 1.5}
RUNS = {
    "zero0": dict(stage=0),
    "zero1": dict(stage=1),
    "zero2": dict(stage=2, reduce_scatter=False),  # also DeepSpeed's own reduction for the PowerSGD exact test
    "zero3": dict(stage=3),
    "zero3_offload": dict(stage=3, offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"}),
}
_results: dict[str, tuple[Path, subprocess.CompletedProcess]] = {}


def run_stage(name, workdir, dvae_dir):
    """The DALL-E trainer's default test run (:func:`train_args`, --check-sync) at ZeRO setting
    ``name`` of :data:`RUNS`: (output folder, the launch's result)."""
    if name not in _results:
        spec = dict(RUNS[name])
        cfg = ds_config(workdir, spec.pop("stage"), **spec)
        if "offload" in name:  # torch's AdamW on offloaded states: no 95 s DeepSpeedCPUAdam JIT build
            data = json.loads(cfg.read_text())
            data["zero_force_ds_cpu_optimizer"] = False
            cfg.write_text(json.dumps(data))
        out = workdir / name
        _results[name] = (out, launch("train_dalle.py", *train_args(dvae_dir, out, cfg, "--check-sync")))
    return _results[name]


def _once(name: str, make) -> Path:
    if name not in _done:
        _done[name] = make()
    return _done[name]


def copied_zero2_run(workdir: Path, dvae_dir: Path, dest: Path) -> tuple[Path, Path]:
    """(the finished ZeRO-2 run of :func:`run_stage`, a copy of it at ``dest`` without its export):
    checkpoints at steps 4 and 6 to damage or resume without touching the shared run."""
    out, proc = run_stage("zero2", workdir, dvae_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("final"))
    return out, dest


def stream_run_args(workdir: Path, dvae_dir: Path, shards: Path, out: Path) -> list:
    """DALL-E on tar shards (2 workers per rank), caption dropout 0.5, through the shipped
    cpu_zero2_fp32_powersgd.json with PowerSGD (rank 4) compressing from step 2."""
    cfg = shipped_config(workdir, "cpu_zero2_fp32_powersgd", communication_hook=RANK4)
    stream = ("--data", shards, "--data-workers", 2, "--shuffle-buffer", 16, "--caption-dropout", 0.5)
    return [str(a) for a in train_args(dvae_dir, out, cfg, *stream)]


def stream_powersgd_run(workdir: Path, dvae_dir: Path, shards: Path) -> Path:
    """The run of :func:`stream_run_args` with --check-sync, its collectives recorded in
    ``<out>/collectives``."""

    def make():
        out = workdir / "stream_powersgd"
        proc = launch("train_dalle.py", *stream_run_args(workdir, dvae_dir, shards, out), "--check-sync",
                      record=out / "collectives")  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return out

    return _once("stream_powersgd", make)


def vq_dvae_run(workdir: Path) -> Path:
    """The VQ dVAE (dvae-demo, MSE) at ZeRO-2 for 6 steps, --check-sync (hashes its codebook buffers
    too), its collectives recorded in ``<out>/collectives``."""

    def make():
        out = workdir / "dvae_vq_run"
        cfg = shipped_config(workdir, "cpu_zero2_fp32")
        args = ["--deepspeed_config", cfg, "--preset", "dvae-demo", "--recon-loss", "mse", "--holdout", 20,
                "--output-dir", out, "--steps", 6, "--micro-batch-size", 8, "--lr", 2e-3, "--no-progress",
                "--check-sync"]  # fmt: skip
        proc = launch("train_dvae.py", *args, record=out / "collectives")
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return out

    return _once("dvae_vq", make)
