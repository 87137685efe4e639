"""Ranks forked from one process that has imported torch, DeepSpeed and dalle_ds already.

Every training rank a test starts would otherwise spend ~2.5 s of a 2-core machine importing the
same modules (torch, DeepSpeed, torch._dynamo, dalle_ds) before its first line of work. A
multiprocessing fork server imports them once (this module is its preload); each rank is a fork of
it that takes the environment the launcher gives a rank, points its stdout/stderr at files, and
runs the script as ``python script.py args`` would (``runpy``, ``__main__``). The launcher's own
behaviour and a fresh interpreter's start-up stay tested where they matter (``launch(...,
launcher=True)``, the two-node and demo tests, the script subprocess tests)."""

import os
import runpy
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)  # ranks run one thread each (OMP_NUM_THREADS=1), and none is started before a fork

import deepspeed  # noqa: E402,F401
import torch._dynamo  # noqa: E402,F401  (the first optimizer imports it)

import dalle_ds.inference.generation  # noqa: E402,F401
import dalle_ds.training  # noqa: E402,F401

LAUNCH_ENV = Path(__file__).resolve().parent / "launch_env"


def run_rank(script: str, argv: list[str], env: dict[str, str], stdout: str, stderr: str) -> None:
    """The body of one forked rank: environment, output files, test-only patches, the script."""
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115  (line-buffered, like -u)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.path.insert(0, str(LAUNCH_ENV))
    import importlib.util

    spec = importlib.util.spec_from_file_location("rank_launch_env", LAUNCH_ENV / "sitecustomize.py")
    spec.loader.exec_module(importlib.util.module_from_spec(spec))  # its install() runs on import
    sys.argv = [script, *argv]
    runpy.run_path(script, run_name="__main__")
    sys.stdout.flush()
    sys.stderr.flush()
