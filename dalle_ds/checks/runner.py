"""The orchestrating process: probe the device, run each check's worker in its own process (train
checks in parallel, the others one at a time), keep the report."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import WORKER
from .checks import Check
from .procs import run_logged, slug, stop_children, tail
from .report import Report, record, result_path

__all__ = ["probe_device", "run_checks"]


def probe_device(smoke: bool, work: Path) -> dict:
    """Versions and the CUDA device, asked in a child process (no CUDA context kept here)."""
    code = (
        "import json, torch\n"
        "try:\n    import deepspeed; ds = deepspeed.__version__\nexcept Exception as e:\n    ds = f'unavailable: {e}'\n"
        "info = {'torch': torch.__version__, 'torch_cuda': torch.version.cuda, 'deepspeed': ds,\n"
        "        'cuda_available': torch.cuda.is_available()}\n"
        "if info['cuda_available']:\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    info.update(device_count=torch.cuda.device_count(), device_name=p.name,\n"
        "                memory_gib=round(p.total_memory / 2**30, 1), capability=f'{p.major}.{p.minor}',\n"
        "                bf16=torch.cuda.is_bf16_supported())\n"
        "print('PROBE ' + json.dumps(info))\n"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu"} if smoke else None  # no accelerator probing noise
    log = work / "logs" / "probe.log"
    rc, _ = run_logged([sys.executable, "-c", code], log, 180, env)
    for line in reversed(tail(log, 20000).splitlines()):
        if line.startswith("PROBE "):
            return json.loads(line[6:])
    return {"cuda_available": False, "error": f"probe failed (exit {rc}): {tail(log, 1500)}"}


def run_checks(checks: list[Check], out: Path, smoke: bool, jobs: int) -> int:
    """Run ``checks``, report to ``out`` (work files in ``<out stem>_files/``); the exit code: 0 all
    passed, 1 a check failed, 2 no CUDA device (unless ``smoke``), 130 interrupted."""
    out = out.resolve()
    work = out.with_name(f"{out.stem}_files")
    for sub in ("results", "logs", "torch_extensions"):
        shutil.rmtree(work / sub, ignore_errors=True)
    (work / "results").mkdir(parents=True)
    ext_dir = work / "torch_extensions"  # fresh: DeepSpeed JIT builds land here, no stale locks
    ext_dir.mkdir()
    started = time.monotonic()
    info = probe_device(smoke, work)
    if not smoke and not info.get("cuda_available"):
        print(
            "gpu_check: no CUDA device (torch.cuda.is_available() is False"
            + (f"; {info['error']}" if "error" in info else f"; torch {info.get('torch')}")
            + "). Run it on a machine with a CUDA GPU, or use --cpu-smoke for the CPU logic check.",
            file=sys.stderr,
        )
        return 2
    mode = "cpu-smoke" if smoke else "gpu"
    if smoke:
        print(f"gpu_check (cpu-smoke): torch {info.get('torch')}, tiny sizes on the CPU", flush=True)
    else:
        print(
            f"gpu_check: {info.get('device_name')} ({info.get('memory_gib')} GiB, sm {info.get('capability')}, "
            f"{info.get('device_count')} visible), torch {info.get('torch')} (CUDA {info.get('torch_cuda')}), "
            f"deepspeed {info.get('deepspeed')}",
            flush=True,
        )
    print(f"gpu_check: {len(checks)} checks; logs in {work / 'logs'}", flush=True)
    report = Report(out, checks, mode, info, work, started)

    def run_check(check: Check) -> None:
        log = work / "logs" / f"{slug(check.name)}.log"
        cmd = [
            *WORKER,
            "--worker",
            check.name,
            "--workdir",
            str(work),
            "--device",
            "cpu" if smoke else "cuda",
            "--ext-dir",
            str(ext_dir),
        ] + (["--smoke"] if smoke else [])
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_EXTENSIONS_DIR": str(ext_dir)}
        if smoke:
            env["DS_ACCELERATOR"] = "cpu"
        code, secs = run_logged(cmd, log, check.timeout, env)
        report.add(record(check, result_path(work, check.name), code, secs, log))

    signal.signal(signal.SIGTERM, lambda *_: (stop_children(), sys.exit(143)))
    try:
        train = [c for c in checks if c.phase == "train"]
        if train:
            with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                list(pool.map(run_check, train))
        for check in checks:
            if check.phase != "train":
                run_check(check)
    except KeyboardInterrupt:
        stop_children()
        report.write()
        print(f"\ngpu_check: interrupted; partial report {out}", file=sys.stderr)
        return 130
    report.write(final=True)
    report.print_summary()
    return 0 if report.ok else 1
