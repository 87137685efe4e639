"""Training runs that several test files assert on, each made once per test session (2 ranks).

A run serves every test that can read its answer from the same outputs: e.g. the streamed
ZeRO-2 + PowerSGD run below gives the stream's exact resume (test_training), PowerSGD's traffic
and error-feedback resume, and the record of every collective (test_distributed)."""

from pathlib import Path

from launching import launch, shipped_config, train_args

_done: dict[str, Path] = {}
RANK4 = {"rank": 4, "start_iter": 2, "min_compression_rate": 1.5}


def _once(name: str, make) -> Path:
    if name not in _done:
        _done[name] = make()
    return _done[name]


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
