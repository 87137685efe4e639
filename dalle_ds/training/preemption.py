"""Preemption: on SIGTERM or SIGUSR1 every rank saves the step it reached and the job exits 75.

Schedulers stop a job with a signal and a grace period, and it reaches the ranks at different
times: SLURM and a process-group kill signal every process at once, DeepSpeed's launcher sends
SIGTERM to one rank after the other (30 s each), a single rank may be the only one signalled.

- :func:`install_signal_handlers` (the entry point, once per process, before any data worker forks
  and inherits them) makes SIGTERM and SIGUSR1 only record that they came. A repeated signal
  changes nothing, so the SIGTERM the launcher sends after the scheduler's cannot interrupt the save.
- :func:`stop_if_signalled`, at every step boundary on every rank, takes the maximum of the recorded
  signal over all ranks: one all-reduce of a CPU tensor on the host group (gloo), no device sync.
  When any rank was signalled, every rank saves that step and raises :class:`Preempted`.
- The entry point exits with :data:`PREEMPTED_EXIT_CODE`; ``--resume`` continues exactly.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

from ..distributed import collectives as dd
from .errors import TrainingStopped

__all__ = ["PREEMPTED_EXIT_CODE", "SIGNALS", "Preempted", "install_signal_handlers", "received", "stop_if_signalled"]

PREEMPTED_EXIT_CODE = 75
"""``EX_TEMPFAIL`` of sysexits.h ("try again later"): the run saved its step; requeue it with ``--resume``."""

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received = 0  # the first of SIGNALS this process received (0: none)


class Preempted(TrainingStopped):
    """Every rank saved the step it reached because a rank was sent SIGTERM or SIGUSR1."""

    def __init__(self, signal_name: str, step: int, save_seconds: float):
        self.signal_name, self.step = signal_name, step
        super().__init__(
            f"preempted by {signal_name} at step {step}: saved it in {save_seconds:.2f} s; exit status "
            f"{PREEMPTED_EXIT_CODE}, continue with --resume"
        )


def _record(signum: int, frame) -> None:
    global _received
    _received = _received or signum


def install_signal_handlers() -> None:
    """Make SIGTERM and SIGUSR1 only record their arrival (from the main thread). System calls they
    interrupt restart where the kernel can (``SA_RESTART``): the flag needs nobody woken early."""
    for sig in SIGNALS:
        signal.signal(sig, _record)
        signal.siginterrupt(sig, False)


def received() -> int:
    """The first of :data:`SIGNALS` this process received since :func:`install_signal_handlers` (0: none)."""
    return _received


def stop_if_signalled(step: int, save: Callable[[], object]) -> None:
    """At a step boundary, on every rank (collective): when any rank received SIGTERM or SIGUSR1,
    ``save()`` the step and raise :class:`Preempted`."""
    signum = int(dd.host_all_reduce(_received, op="max"))
    if signum:
        start = time.perf_counter()
        save()
        raise Preempted(signal.Signals(signum).name, step, time.perf_counter() - start)
