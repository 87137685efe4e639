"""Training metrics: ``metrics.jsonl`` (rank 0), DeepSpeed's monitors, the progress bar, and the
device-side values behind them (losses, the non-finite counter), read to the host only at logged steps."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..distributed import collectives as dd
from ..distributed import ds_adapter
from ..utils.files import atomic_write_text

__all__ = [
    "MetricsLog",
    "NonFiniteRun",
    "check_ranks_identical",
    "parameter_digest",
    "peak_rss_mb_all_ranks",
    "read_to_host",
    "sum_over_ranks",
]


class MetricsLog:
    """One JSON line per logged step in ``<output>/metrics.jsonl``, the same floats to the monitors the
    DeepSpeed config enables (``Train/<key>``), and a tqdm bar; all on rank 0 only."""

    def __init__(self, out: Path, rank: int, log_every: int, total_steps: int):
        self.path = Path(out) / "metrics.jsonl"
        self.rank = rank
        self.log_every = log_every
        self.total_steps = total_steps
        self.bar = None
        self.start_interval()

    def truncate_after(self, step: int) -> None:
        """Drop lines past ``step``: after a resume they belong to the run that died."""
        if self.rank == 0 and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
            atomic_write_text(self.path, "".join(f"{ln}\n" for ln in keep))

    def open_bar(self, desc: str, initial: int) -> None:
        if self.rank == 0:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=initial, desc=desc, dynamic_ncols=True)

    def start_interval(self) -> None:
        """Start timing the steps up to the next record (their tokens go into ``interval_tokens``)."""
        self.interval_start, self.interval_tokens = time.perf_counter(), 0

    def host_record(self, record: dict[str, Any], world: int) -> dict[str, Any]:
        """A logged step's record on the host, on every rank: its tensors as the whole global batch's
        (:func:`_over_ranks`) read in one transfer (rounded to 6 digits), ``tokens_per_s`` of all ranks
        over the interval since the last record and the largest rank's ``peak_rss_mb`` (collective)."""
        values = read_to_host(_over_ranks(record), ndigits=6)
        now = time.perf_counter()  # after the read: the device has finished the interval's work
        values["tokens_per_s"] = round(self.interval_tokens * world / (now - self.interval_start), 1)
        self.interval_start, self.interval_tokens = now, 0
        values["peak_rss_mb"] = peak_rss_mb_all_ranks()
        return values

    def due(self, step: int) -> bool:
        """Whether ``step`` is a logged step (every ``log_every`` and the last): the only steps whose
        device values are read to the host."""
        return step % self.log_every == 0 or step == self.total_steps

    def advance(self) -> None:
        """A step that is not logged: the bar moves, its values stay as the last logged step left them."""
        if self.bar is not None:
            self.bar.update(1)

    def write(self, engine, record: dict[str, Any]) -> None:
        """A logged step's record (host values): a JSON line, the monitors and the bar (rank 0)."""
        if self.rank != 0:
            return
        step = record["step"]
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


class NonFiniteRun:
    """Consecutive optimizer steps whose loss was non-finite, counted on the loss's device (no host
    read per step): ``run`` is the current run, ``longest`` the longest run since the last logged
    step (:meth:`interval_done`)."""

    def __init__(self, device: torch.device | str, run: int = 0):
        self.run = torch.tensor(float(run), device=device)
        self.longest = self.run.clone()

    def update(self, loss: torch.Tensor) -> None:
        self.run = torch.where(torch.isfinite(loss), 0.0, self.run + 1)
        self.longest = torch.maximum(self.longest, self.run)

    def interval_done(self) -> None:
        """``longest`` was read (at a logged step): the next interval's starts from the current run."""
        self.longest = self.run.clone()


LARGEST = ("longest_bad_run",)  # record keys reduced over ranks by max, not mean


def _over_ranks(record: dict[str, Any]) -> dict[str, Any]:
    """A record's device values (0-d, on the engine's device) over all ranks: the mean (each rank's
    value is the mean over its equal share of the global batch, so the mean is the global batch's:
    the loss does not depend on the number of ranks), the largest for :data:`LARGEST` (every rank's
    non-finite guard then decides alike). Two all-reduces of a few floats, at logged steps only."""
    world = dd.world_size()
    if world == 1:
        return record
    out = dict(record)
    for op in ("mean", "max"):
        keys = [k for k, v in record.items() if torch.is_tensor(v) and (k in LARGEST) == (op == "max")]
        if keys:
            stacked = torch.stack([record[k].detach().float().reshape(()) for k in keys])
            dd.all_reduce(stacked, op="sum" if op == "mean" else "max")
            out.update(zip(keys, (stacked / world if op == "mean" else stacked).unbind(), strict=True))
    return out


def read_to_host(values: dict[str, Any], ndigits: int | None = None) -> dict[str, Any]:
    """``values`` with every tensor (0-d, all on one device) replaced by its Python float (rounded to
    ``ndigits`` when given), read in one transfer: one stacked ``tolist``, one host sync. Other values
    pass through."""
    keys = [k for k, v in values.items() if torch.is_tensor(v)]
    if not keys:
        return dict(values)
    read = torch.stack([values[k].detach().float().reshape(()) for k in keys]).tolist()
    if ndigits is not None:
        read = [round(v, ndigits) for v in read]
    return {**values, **dict(zip(keys, read, strict=True))}


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


def check_ranks_identical(module, gather: bool, path: Path) -> str:
    """:func:`parameter_digest` of ``module`` written to ``path`` and compared across ranks (collective);
    raises when ranks hold different parameters. Returns the digest."""
    mine = parameter_digest(module, gather=gather)
    every = dd.all_gather_object(mine)
    atomic_write_text(path, mine + "\n")
    if len(set(every)) != 1:
        raise RuntimeError(f"ranks hold different parameters: {every}")
    return mine


def sum_over_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Every rank's counters summed, keys sorted (collective: host objects, gathered)."""
    total: dict[str, int] = {}
    for rank_counts in dd.all_gather_object(counts):
        for k, v in rank_counts.items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))
