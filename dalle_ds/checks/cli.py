"""One-GPU acceptance check of dalle-ds: ``bash scripts/gpu_check.sh`` (or ``scripts/gpu_check.py``
in the project's venv) on a machine with one CUDA GPU; estimated 7-8 minutes on an H100/H200-class GPU.

    python scripts/gpu_check.py [--out outputs/gpu_check/report.json] [--only train,attention] [--jobs 4]
    python scripts/gpu_check.py --list          # the checks, no GPU needed
    python scripts/gpu_check.py --cpu-smoke     # the checks' code at tiny sizes on the CPU (CI)

(``python -m dalle_ds.checks`` takes the same arguments.)

Checks (each runs in its own process with a timeout, so one failure or hang never stops the others):

train/<trainer>/<config>
    ``scripts/train_dvae.py`` and ``scripts/train_dalle.py`` through the real ``deepspeed`` launcher
    (``--num_gpus 1``) with ``ds_configs/zero{2,3}_{fp16,bf16}.json``, a few steps with
    ``--check-sync`` and ``--save-every``; then every loss in ``metrics.jsonl`` is finite, the
    exported ``final`` loads (``load_model`` / ``load_pipeline``) and runs on the GPU. Prints the
    first/last loss, loss scale and skipped steps. The DALL-E runs use a random-weight dVAE folder.
attention/fp32, attention/bf16
    Block-sparse attention (``attention_impl: block``) against the dense reference on CUDA, per
    layer kind (row, column, conv) at the paper's sequence (text 256 + 32x32 image, 8 heads of 64):
    outputs, input gradients and parameter gradients. bf16 is compared with bf16 dense and with
    fp32 dense (max abs errors reported).
kvcache/fp32
    ``generate(use_cache=True)`` equals ``use_cache=False`` token for token (fixed seeds, fp32,
    ``dalle-small``); tokens/s of both.
sampling/pipeline
    A random-weight ``dalle-small`` pipeline saved as shards: the full cache, the bounded cache and
    recomputation draw the same tokens (fp32, plain and ``cond_scale=3``, shared prefill, primed
    rows); CUDA's sync debug mode finds no synchronising call that grows with the tokens drawn; bf16
    samples valid codes; accelerate with blocks on GPU 0, the CPU and disk samples the same tokens;
    FID (small extractor) is computed on the device.
throughput/dalle-1.3b
    The DALL-E trainer (``DalleTrainer`` through DeepSpeed, ``ds_configs/zero2_bf16.json``, one rank)
    on ``dalle-1.3b`` with in-process synthetic codes, the micro batch the largest the dry run fits:
    its own tokens/s, ms/step, achieved TFLOP/s and model FLOPs utilisation (matmul + attention
    FLOPs, ``dalle_ds/checks/flops.py``) against the GPU's peak dense bf16 FLOP/s (``PEAK_BF16``), and
    the peak GPU memory against the dry run's prediction.

Prints PASS/FAIL per check and a summary, writes a JSON report (``--out``) and exits 1 if any
check failed, 2 if there is no CUDA device. Work files (logs, runs, a fresh TORCH_EXTENSIONS_DIR)
go to ``<report stem>_files/`` beside the report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .checks import all_checks
from .runner import run_checks
from .worker import run_worker

__all__ = ["main"]


def main(argv=None, prog: str | None = None) -> int:
    """The command line; returns the exit code (0 all passed, 1 a check failed, 2 no CUDA device)."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/gpu_check/report.json", help="JSON report path")
    p.add_argument("--list", action="store_true", help="print the checks and exit")
    p.add_argument("--only", default="", help="comma-separated name prefixes, e.g. train/dalle,attention")
    p.add_argument("--jobs", type=int, default=4, help="train checks run this many at a time")
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="the checks' code at tiny sizes on the CPU: one DALL-E run with the CPU config, attention, "
        "KV cache, throughput",
    )
    # A worker: this command again, for one check (runner starts it, worker runs it).
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ext-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return run_worker(args)

    checks = all_checks(args.cpu_smoke)
    if args.only:
        prefixes = [s.strip() for s in args.only.split(",") if s.strip()]
        checks = [c for c in checks if any(c.name.startswith(pre) for pre in prefixes)]
        if not checks:
            p.error(f"--only {args.only!r} matches no check; see --list")
    if args.list:
        for c in checks:
            print(f"{c.name:<27} {c.timeout:>4} s  {c.about}")
        return 0
    return run_checks(checks, Path(args.out), smoke=args.cpu_smoke, jobs=args.jobs)
