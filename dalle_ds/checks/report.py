"""The PASS/FAIL record of each check and the JSON report, rewritten (atomically) after every check."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from dalle_ds.utils.files import atomic_path

from .checks import Check
from .procs import slug, tail

__all__ = ["Report", "record", "result_path"]


def result_path(work: Path, name: str) -> Path:
    """Where the worker of check ``name`` writes its result (``dalle_ds.checks.worker``)."""
    return work / "results" / f"{slug(name)}.json"


def record(check: Check, result: Path, code: int | None, secs: float, log: Path) -> dict:
    """The report row of ``check``: its worker's ``result`` file, or a FAIL saying why there is none
    (``code``: the worker's exit code, None when it timed out)."""
    if result.is_file():
        res = json.loads(result.read_text())
    elif code is None:
        res = {
            "status": "FAIL",
            "details": {},
            "error": f"timed out after {check.timeout} s; log tail:\n{tail(log)}",
        }
    else:
        res = {
            "status": "FAIL",
            "details": {},
            "error": f"worker exited {code} without a result; log tail:\n{tail(log)}",
        }
    return {
        "name": check.name,
        "status": res["status"],
        "seconds": round(secs, 1),
        "log": str(log),
        "summary": res.get("details", {}).get("summary", ""),
        "error": res.get("error"),
        "details": res.get("details", {}),
    }


class Report:
    """The rows of ``checks`` as they finish, printed as ``[PASS]``/``[FAIL]`` lines and written to
    ``out`` (JSON: mode, environment, report_files, checks, passed, failed, complete, ok, seconds)."""

    def __init__(self, out: Path, checks: list[Check], mode: str, info: dict, work: Path, started: float):
        self.out, self.checks, self.mode, self.started = out, checks, mode, started
        self.data = {"mode": mode, "environment": info, "report_files": str(work), "checks": []}
        self.results: dict[str, dict] = {}
        self._lock = threading.Lock()

    @property
    def ok(self) -> bool:
        return self.data["ok"]

    def add(self, row: dict) -> None:
        """Record a finished check (thread-safe): print its line, rewrite the report."""
        with self._lock:
            self.results[row["name"]] = row
            print(f"[{row['status']}] {row['name']:<27} {row['seconds']:6.1f} s  {row['summary']}", flush=True)
            if row["status"] != "PASS" and row["error"]:
                print("    " + row["error"].strip().replace("\n", "\n    ")[-3000:], flush=True)
            self.write()

    def write(self, final: bool = False) -> None:
        rows = [self.results[c.name] for c in self.checks if c.name in self.results]
        report = self.data
        report["checks"] = rows
        report["passed"] = sum(r["status"] == "PASS" for r in rows)
        report["failed"] = sum(r["status"] != "PASS" for r in rows)
        report["complete"] = final and len(rows) == len(self.checks)
        report["ok"] = report["complete"] and report["failed"] == 0
        report["seconds"] = round(time.monotonic() - self.started, 1)
        with atomic_path(self.out) as tmp:
            tmp.write_text(json.dumps(report, indent=1, default=str) + "\n")

    def print_summary(self) -> None:
        report = self.data
        print()
        print(
            f"gpu_check summary ({self.mode}, {report['seconds']:.0f} s): "
            f"{report['passed']} passed, {report['failed']} failed"
        )
        for c in self.checks:
            print(f"  {self.results[c.name]['status']:<4} {c.name}")
        print(f"report: {self.out}")
