"""Test-only fault injection: the one seam through which tests crash or poison a training run.

Off unless the environment variable ``DALLE_DS_TEST_FAULTS`` holds a JSON object, e.g.
``{"kill_after_step": 5}``. Keys:

- ``kill_after_step``: SIGKILL rank ``rank`` (default 1) right after optimizer step N, before
  anything of step N is saved: a crash mid-run;
- ``kill_in_save``: SIGKILL rank ``rank`` while saving the checkpoint of step N, after its files are
  written and before the checkpoint is marked complete: a crash mid-save;
- ``overflow_at_step``: multiply every rank's loss by inf in step N: an fp16 overflow in backward;
- ``signal_after_step`` / ``signal_in_save``: rank ``rank`` sends ``signal_name`` (``"TERM"``,
  default, or ``"USR1"``) right after optimizer step N / while saving the checkpoint of step N (where
  ``kill_in_save`` kills), to ``signal_to``: ``"rank"`` itself (default), ``"group"`` its process
  group, or ``"session"`` its session leader (the script that started the job in a new session),
  and waits until the signal has reached it (from the leader: at most 60 s): preemption.

The trainer calls :meth:`Faults.after_step`, :meth:`Faults.in_save` and :meth:`Faults.loss` at those
three points; with the variable unset they do nothing.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, fields

import torch

from . import preemption

__all__ = ["ENV", "Faults"]

ENV = "DALLE_DS_TEST_FAULTS"


@dataclass(frozen=True)
class Faults:
    kill_after_step: int | None = None
    kill_in_save: int | None = None
    overflow_at_step: int | None = None
    signal_after_step: int | None = None
    signal_in_save: int | None = None
    signal_name: str = "TERM"
    signal_to: str = "rank"
    rank: int = 1

    @classmethod
    def from_env(cls) -> Faults:
        text = os.environ.get(ENV)
        if not text:
            return cls()
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{ENV}: unknown keys {unknown}; known: {sorted(known)}")
        return cls(**data)

    @staticmethod
    def _kill() -> None:
        os.kill(os.getpid(), 9)

    def _signal(self) -> None:
        sig = signal.Signals[f"SIG{self.signal_name}"]
        pid = {"rank": os.getpid(), "group": -os.getpgid(0), "session": os.getsid(0)}[self.signal_to]
        os.kill(pid, sig)
        deadline = time.monotonic() + 60
        while not preemption.received() and time.monotonic() < deadline:  # the leader's copy is on its way
            time.sleep(0.01)

    def after_step(self, step: int, rank: int) -> None:
        if self.kill_after_step == step and rank == self.rank:
            self._kill()
        if self.signal_after_step == step and rank == self.rank:
            self._signal()

    def in_save(self, step: int, rank: int) -> None:
        if self.kill_in_save == step and rank == self.rank:
            self._kill()
        if self.signal_in_save == step and rank == self.rank:
            self._signal()

    def loss(self, loss: torch.Tensor, step: int) -> torch.Tensor:
        """``step``: the step being computed (1-based)."""
        return loss * float("inf") if self.overflow_at_step == step else loss
