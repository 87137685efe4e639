"""PowerSGD at a preset's layer shapes: bytes per step and compression time against the backward pass
(``scripts/bench_powersgd.py`` prints the table). The hook runs on real gradients of a few residual
blocks in one process: what is timed is the compression math; bytes come from the hook's own
counters, per GPU. Needs a process group (one rank is enough)."""

from __future__ import annotations

import statistics
import time

import torch

from dalle_ds.distributed.powersgd import PowerSGD, PowerSGDConfig
from dalle_ds.models.dalle import Block

__all__ = ["block_grads", "measure_setting", "median_ms", "row_shard", "settings"]


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
