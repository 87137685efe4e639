"""PowerSGD benchmarks (``scripts/bench_powersgd.py`` prints the tables).

- Bytes and time at a preset's layer shapes: the hook on real gradients of a few residual blocks in
  one process (needs a process group, one rank is enough); the compression math is timed, bytes
  come from the hook's own counters, per GPU.
- Memory: the DALL-E trainer on 2 ranks (bf16, ZeRO-2) with the hook off and on, peak RSS per
  compressed parameter (:func:`memory_runs`).
- Convergence: final losses with fp32 and 16-bit residuals over seeds (:func:`final_loss`).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import torch

from dalle_ds.distributed.powersgd import PowerSGD, PowerSGDConfig
from dalle_ds.models.dalle import DALLE, Block

from .train import launch_command

__all__ = [
    "FIXED_MALLOC",
    "MEMORY_DS_CONFIG",
    "block_grads",
    "final_loss",
    "measure_setting",
    "median_ms",
    "memory_runs",
    "param_counts",
    "row_shard",
    "settings",
    "train_rows",
]

# The memory runs' engine: bf16, ZeRO-2 (5M-element buckets by default), the hook's bucket path on.
MEMORY_DS_CONFIG = {
    "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "bf16": {"enabled": True},
    "zero_optimization": {
        "stage": 2,
        "reduce_scatter": False,
        "reduce_bucket_size": 5_000_000,
        "allgather_bucket_size": 5_000_000,
        "overlap_comm": False,
        "contiguous_gradients": True,
    },
}


def median_ms(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def row_shard(g: torch.Tensor, shards: int, index: int) -> torch.Tensor:
    """Shard ``index`` of ``shards`` of ``g``'s rows (its matrix view): what one GPU of a node holds
    after the in-node reduce-scatter of the paper's hierarchical layout."""
    rows = g.reshape(g.shape[0], -1) if g.ndim >= 2 else g.reshape(-1)
    return rows.tensor_split(shards)[index].clone()


def block_grads(config, blocks: int, batch: int, rounds: int) -> tuple[list[tuple[str, torch.Tensor]], float]:
    """Gradients of ``blocks`` residual blocks of ``config`` (kinds row, column, conv in turn) for one
    micro-batch of ``batch`` full sequences, and the median backward time in ms (after a warm-up)."""
    kinds = ["row", "column", "conv"]
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(Block(config, kinds[i % 3]) for i in range(blocks)))
    params = [(n, p) for n, p in model.named_parameters()]
    x = torch.randn(batch, config.seq_len, config.d_model)

    def backward():
        model.zero_grad(set_to_none=True)
        loss = model(x).float().pow(2).mean()
        start = time.perf_counter()
        loss.backward()
        return (time.perf_counter() - start) * 1e3

    backward()  # warm-up
    backward_ms = statistics.median(backward() for _ in range(rounds))
    return [(n, p.grad.detach().clone()) for n, p in params], backward_ms


def settings(grads, gpus_per_node: int, total_rank: int, flat_ranks: list[int]) -> list[tuple[str, list, int]]:
    """(name, gradients, rank) per setting: the paper's (this GPU's 1/G row shard of every tensor at rank
    ``total_rank``/G) and flat (every matrix whole, at each of ``flat_ranks``)."""
    shard_rank = total_rank // gpus_per_node
    out = [
        (
            f"paper: {gpus_per_node} shards x r={shard_rank}",
            [(n, row_shard(g, gpus_per_node, 0)) for n, g in grads],
            shard_rank,
        )
    ]
    out += [(f"flat r={r}", grads, r) for r in flat_ranks]
    return out


def measure_setting(tensors, rank: int, rounds: int) -> dict:
    """The hook at ``rank`` (fp16 P and Q, Householder) on copies of ``tensors``: MB this GPU sends
    per step, an uncompressed all-reduce of the same tensors in fp32 and in 16 bits, and the median
    ms of a steady-state step (the first call draws and orthogonalises Q: not timed)."""
    hook = PowerSGD(
        PowerSGDConfig(rank=rank, start_iter=0, min_compression_rate=2, dtype="fp16", orthogonalization="householder")
    )
    hook.reduce([(n, g.clone()) for n, g in tensors])
    sent, full32 = (b / 1e6 for b in hook.last_step_bytes)  # plain: the same tensors in fp32

    def step():
        hook.reduce([(n, g.clone()) for n, g in tensors])

    return {"sent_mb": sent, "plain16_mb": full32 / 2, "plain32_mb": full32, "ms": median_ms(step, rounds)}


def param_counts(config, hook_config: PowerSGDConfig) -> tuple[int, int]:
    """(parameters of ``config``'s DALL-E, those the flat hook compresses), counted on the meta device."""
    hook = PowerSGD(hook_config)
    with torch.device("meta"):
        params = list(DALLE(config).parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if hook._compressible(p))


# glibc's malloc raises its mmap threshold as large blocks are freed, after which freed tensors stay
# in the heap and peak RSS drifts from run to run (+-150 MiB at 58M parameters); a fixed threshold
# returns every block of 1 MiB or more to the system when it is freed, so RSS follows live tensors.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def train_rows(
    tmp: Path, name: str, ds_config: dict, train_script: Path, preset, dvae, steps: int, mbs: int, *extra, env=None
):
    """``metrics.jsonl`` rows of the DALL-E trainer on 2 CPU ranks under the deepspeed launcher
    (``ds_config`` written to ``tmp/<name>.json``, output in ``tmp/<name>``, one thread per rank,
    ``env`` added to the environment)."""
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(ds_config))
    out = tmp / name
    cmd = [*launch_command(train_script, path, preset, dvae, out, steps, mbs), *map(str, extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def memory_runs(
    tmp: Path, train_script: Path, preset, dvae, hooks: dict, steps: int, mbs: int, repeats: int = 1, bucket=5_000_000
) -> dict[str, float]:
    """Largest peak RSS (MiB) of any rank per setting, the median of ``repeats`` runs (settings
    interleaved, malloc's mmap threshold fixed: :data:`FIXED_MALLOC`): ``hooks`` maps a name to a
    ``communication_hook`` section, or None for DeepSpeed's own reduction. ``bucket``: elements per
    gradient bucket (``reduce_bucket_size``)."""
    peaks: dict[str, list[float]] = {name: [] for name in hooks}
    for repeat in range(repeats):
        for name, hook in hooks.items():
            zero = {**MEMORY_DS_CONFIG["zero_optimization"], "reduce_bucket_size": bucket}
            cfg = {**MEMORY_DS_CONFIG, "zero_optimization": zero, **({"communication_hook": hook} if hook else {})}
            run = f"{name.replace(' ', '_').replace(',', '')}_{repeat}"
            rows = train_rows(tmp, run, cfg, train_script, preset, dvae, steps, mbs, env=FIXED_MALLOC)
            peaks[name].append(max(r["peak_rss_mb"] for r in rows))
    return {name: statistics.median(values) for name, values in peaks.items()}


def final_loss(rows: list[dict], last: int = 5) -> float:
    """Mean loss of the last ``last`` steps of a run's metrics rows."""
    return statistics.fmean(r["loss"] for r in rows[-last:])
