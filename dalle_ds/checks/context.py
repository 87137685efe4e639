"""What a check's worker gets (``Ctx``), how it fails on its own verdict (``CheckFailed``), and the
small helpers the workers share."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CheckFailed", "Ctx", "finite", "strict_fp32", "sync"]


class CheckFailed(Exception):
    """A check's own verdict (as opposed to a crash): ``CheckFailed(message, details)``; the message
    says what was wrong, the details go to the report."""


@dataclass
class Ctx:
    work: Path
    device: str
    smoke: bool
    ext_dir: Path
    lines: list[str] = field(default_factory=list)

    def say(self, msg: str) -> None:
        self.lines.append(msg)
        print(msg, flush=True)


def strict_fp32() -> None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def finite(values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
