"""The command line of a local ``deepspeed`` launch: what the demo, the GPU check, the benchmarks and
the tests start their ranks with."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from .collectives import free_port

__all__ = ["deepspeed_command", "deepspeed_launcher"]


def deepspeed_launcher() -> str:
    """The ``deepspeed`` launcher of this Python's environment (the one on PATH where it has none)."""
    launcher = Path(sys.executable).with_name("deepspeed")
    return str(launcher) if launcher.exists() else (shutil.which("deepspeed") or str(launcher))


def deepspeed_command(script: str | Path, *args, num_gpus: int) -> list[str]:
    """``python <launcher> --num_gpus N --master_port <a free port> script args``: ``num_gpus`` ranks
    on this machine (processes on the CPU accelerator), the launcher run by this interpreter."""
    launcher = [sys.executable, deepspeed_launcher(), "--num_gpus", str(num_gpus), "--master_port", str(free_port())]
    return [*launcher, str(script), *map(str, args)]
