"""Child processes: each in its own process group, output to a log, stopped as a group on a timeout
or when this process is told to stop (``stop_children``)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

from . import ROOT

__all__ = ["kill_group", "run_logged", "slug", "stop_children", "tail"]

_children: set[int] = set()  # process groups this process started and has not reaped
_children_lock = threading.Lock()


def kill_group(pgid: int, grace: float = 10.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def run_logged(cmd: list[str], log: Path, timeout: float, env: dict | None = None) -> tuple[int | None, float]:
    """Run ``cmd`` in its own process group, output to ``log``; (exit code or None on timeout, seconds).
    On timeout the whole group (e.g. the launcher and its ranks) is stopped."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env, start_new_session=True)
        with _children_lock:
            _children.add(proc.pid)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
            proc.wait()
            code = None
        finally:
            with _children_lock:
                _children.discard(proc.pid)
            if code is not None:
                kill_group(proc.pid, grace=2.0)  # leftovers of a finished group (none normally)
    return code, time.monotonic() - start


def stop_children(*_) -> None:
    """Stop every process group ``run_logged`` started and has not reaped (usable as a signal handler)."""
    with _children_lock:
        groups = list(_children)
    for pgid in groups:
        kill_group(pgid, grace=5.0)


def tail(path: Path, chars: int = 2500) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:]


def slug(name: str) -> str:
    """A check name as a file name: ``train/dalle/zero2_fp16`` -> ``train__dalle__zero2_fp16``."""
    return name.replace("/", "__")
