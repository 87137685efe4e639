"""A check's own process: run its worker, write its result JSON (always, unless killed)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from dalle_ds.utils.files import atomic_path

from .attention_speed import worker_attention_speed
from .checks import Check, all_checks
from .context import CheckFailed, Ctx
from .kernel_checks import worker_attention, worker_kvcache
from .procs import stop_children
from .report import result_path
from .sampling_checks import worker_sampling
from .throughput import worker_throughput
from .training_checks import worker_train

__all__ = ["WORKERS", "run_check", "run_worker"]

WORKERS = {
    "train": worker_train,
    "attention": worker_attention,
    "attention_speed": worker_attention_speed,
    "kvcache": worker_kvcache,
    "sampling": worker_sampling,
    "throughput": worker_throughput,
}


def run_check(check: Check, ctx: Ctx) -> dict:
    """Run ``check``'s worker in this process; its result: ``status`` (PASS/FAIL), ``details``,
    ``error`` and ``worker_s``. The check's own verdict (:class:`CheckFailed`) and a crash (its
    traceback printed) are a FAIL; child processes it left are stopped."""
    start = time.monotonic()
    try:
        status, details = WORKERS[check.phase](ctx, check.params)
        error = None
    except CheckFailed as err:
        status, details = "FAIL", (err.args[1] if len(err.args) > 1 else {})
        error = err.args[0]
    except Exception as err:  # a crash is a failed check, with its traceback in the log
        import traceback

        traceback.print_exc()
        status, details, error = "FAIL", {}, f"{type(err).__name__}: {err}"
    finally:
        stop_children()
    return {"status": status, "details": details, "error": error, "worker_s": round(time.monotonic() - start, 1)}


def run_worker(args) -> int:
    """Child process: run one check, write its result JSON (always, unless killed).

    ``args``: ``worker`` (the check's name), ``workdir``, ``device``, ``smoke``, ``ext_dir``."""
    signal.signal(signal.SIGTERM, lambda *_: (stop_children(), os._exit(143)))
    check = next(c for c in all_checks(args.smoke) if c.name == args.worker)
    if check.name in os.environ.get("GPU_CHECK_CRASH", "").split(","):  # tests: a worker that dies
        os._exit(3)
    work = Path(args.workdir)
    ctx = Ctx(work, args.device, args.smoke, Path(args.ext_dir))
    if args.smoke:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    result = run_check(check, ctx)
    with atomic_path(result_path(work, check.name)) as tmp:
        tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    from dalle_ds.distributed import collectives

    collectives.destroy()  # the process group a check made (throughput), before the interpreter's exit
    return 0
