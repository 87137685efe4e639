"""Per-step training metrics: ``metrics.jsonl`` (rank 0), DeepSpeed's monitors, the progress bar."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from ..distributed import collectives as dd
from ..distributed import ds_adapter
from ..utils.files import atomic_write_text

__all__ = ["MetricsLog", "parameter_digest", "peak_rss_mb_all_ranks"]


class MetricsLog:
    """One JSON line per logged step in ``<output>/metrics.jsonl``, the same floats to the monitors the
    DeepSpeed config enables (``Train/<key>``), and a tqdm bar; all on rank 0 only."""

    def __init__(self, out: Path, rank: int, log_every: int, total_steps: int):
        self.path = Path(out) / "metrics.jsonl"
        self.rank = rank
        self.log_every = log_every
        self.total_steps = total_steps
        self.bar = None

    def truncate_after(self, step: int) -> None:
        """Drop lines past ``step``: after a resume they belong to the run that died."""
        if self.rank == 0 and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            atomic_write_text(self.path, "".join(f"{ln}\n" for ln in keep))

    def open_bar(self, desc: str, initial: int) -> None:
        if self.rank == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=initial, desc=desc, dynamic_ncols=True)

    def write(self, engine, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        step = record["step"]
        if step % self.log_every == 0 or step == self.total_steps:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        ds_adapter.write_monitor(engine, [(f"Train/{k}", v, step) for k, v in record.items() if isinstance(v, float)])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(
                loss=f"{record['loss']:.4f}",
                tok_s=f"{record['tokens_per_s']:.0f}",
                scale=record["loss_scale"],
                skipped=record["skipped_steps"],
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def peak_rss_mb_all_ranks() -> float:
    """Largest peak resident memory (VmHWM) over all ranks, in MiB (Linux; 0 elsewhere); collective."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kib = 0
    return round(dd.host_all_reduce(kib / 1024.0, op="max"), 1)


def parameter_digest(module, gather: bool) -> str:
    """SHA-256 of a module's trainable parameters (``gather``: ZeRO-3 partitions gathered first,
    collective) and its buffers (e.g. the dVAE's EMA codebook): equal on every rank of a healthy run."""
    params = [p for p in module.parameters() if p.requires_grad]
    digest = hashlib.sha256()
    with ds_adapter.gathered(params, enabled=gather):
        for p in params:
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    for b in module.buffers():
        digest.update(b.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
