"""Resuming on another number of ranks (a node lost, or more nodes free).

A ZeRO checkpoint's optimizer state is partitioned over the ranks that wrote it, and DeepSpeed loads
it only at the same data-parallel size. When ``--resume`` finds a checkpoint written by another
number of ranks (from its marker):

- the global batch is kept: gradient accumulation is recomputed as global batch / (micro batch x
  ranks), and a global batch the new ranks cannot make is an error naming the numbers
  (:func:`kept_global_batch`);
- rank 0 converts the checkpoint once to DeepSpeed's universal format, into ``<tag>/universal``
  (written under a temporary name and renamed, so an interrupted conversion is redone and a
  finished one is reused; it is pruned with its checkpoint), and every rank loads it
  (:func:`universal_copy`);
- the step, LR schedule, loss scale, per-resblock scales and the dVAE's EMA come from the
  checkpoint as at the same size; each rank takes the RNG states of old rank ``rank % old ranks``;
  a streamed data set's position is re-dealt from every old rank's (``dalle_ds.data``); the
  PowerSGD hook's residuals and Q's start afresh (they belong to the old ranks' gradient
  partitions; a fresh start costs one step of compression error, as at the hook's first step)
  while its schedule (step count, counters) carries on.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ..distributed import collectives as dd
from ..distributed import ds_adapter
from .errors import UsageError
from .integrity import COMPLETE, FORMAT, manifest, verify_folder

__all__ = ["UNIVERSAL", "kept_global_batch", "old_rank_states", "prepared_ds_config", "stream_state", "universal_copy"]

UNIVERSAL = "universal"  # the converted copy, inside the checkpoint folder


def checkpoint_global_batch(marker: dict[str, Any]) -> int | None:
    """The global batch (samples per optimizer step) a checkpoint was trained with."""
    if "global_batch" in marker:
        return int(marker["global_batch"])
    step = marker.get("step", 0)
    return marker["samples_seen"] // step if step and "samples_seen" in marker else None


def kept_global_batch(marker: dict[str, Any], folder: Path, micro: int, world: int) -> int:
    """The gradient accumulation that keeps the checkpoint's global batch on ``world`` ranks of
    ``micro`` samples; raises UsageError naming the numbers when there is none."""
    total = checkpoint_global_batch(marker)
    if total is None:
        raise UsageError(f"{folder}: its marker has no global batch; resume it on {marker.get('world_size')} ranks")
    if total % (micro * world):
        raise UsageError(
            f"{folder}: its global batch of {total} samples (written by {marker.get('world_size')} ranks) cannot be "
            f"made by {world} ranks x micro batch {micro}: {total} is not a multiple of {micro * world}. Choose "
            f"--micro-batch-size dividing {total // world if total % world == 0 else total} or another number of ranks"
        )
    return total // (micro * world)


def prepared_ds_config(cfg, raw: dict[str, Any], world: int, chosen, log) -> dict[str, Any]:
    """The run's DeepSpeed JSON (``RunConfig.prepared_ds_config``); when ``chosen`` (the checkpoint
    ``--resume`` loads: tag, marker) was written by another number of ranks, with the gradient
    accumulation that keeps its global batch."""
    prepared = cfg.prepared_ds_config(raw, world)
    if chosen is None or chosen[1].get("world_size", world) == world:
        return prepared
    (tag, marker), micro = chosen, prepared["train_micro_batch_size_per_gpu"]
    accum = kept_global_batch(marker, Path(cfg.output_dir) / "checkpoints" / tag, micro, world)
    fresh = "; PowerSGD's residuals and Q's start afresh" if raw.get("communication_hook") else ""
    log(f"--resume: {tag} was written by {marker['world_size']} ranks, resumed on {world}: global batch "
        f"{accum * micro * world} kept, gradient accumulation {accum}{fresh}")  # fmt: skip
    return cfg.prepared_ds_config(raw, world, grad_accum=accum)


def universal_copy(folder: Path, rank: int, log=lambda msg: None) -> Path:
    """``folder``'s universal form (collective). Made by rank 0 the first time, with a marker of its
    files' sizes and SHA-256s like a checkpoint's, and verified by the ranks when reused: a damaged
    copy is made again. A copy without a marker was converted outside dalle-ds (DeepSpeed's own
    tool, ahead of the resume): used as it is."""
    target = folder / UNIVERSAL
    if target.is_dir():
        problems = verify_folder(target) if (target / COMPLETE).exists() else None
        if not problems:
            note = " (converted outside dalle-ds, not verified)" if problems is None else ""
            log(f"--resume: using {target}{note}")
            return target
        log(f"--resume: {target} is damaged ({'; '.join(problems)}): converting again")
        if rank == 0:
            shutil.rmtree(target)
    tmp, error = folder / f".{UNIVERSAL}.tmp", None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            ds_adapter.convert_to_universal(folder, tmp)
        except Exception as err:  # reported on every rank, not left for a barrier to hang on
            error = f"{type(err).__name__}: {err}"
    first = dd.all_gather_object(error)[0]
    if first:
        raise RuntimeError(f"{folder}: converting to DeepSpeed's universal checkpoint format failed: {first}")
    files = manifest(tmp)
    if rank == 0:
        (tmp / COMPLETE).write_text(json.dumps({"format": FORMAT, "source": folder.name, "files": files}) + "\n")
        os.replace(tmp, target)
    dd.barrier()
    log(f"--resume: converted {folder.name} to {target}")
    return target


def old_rank_states(folder: Path, key: str, world: int) -> list[Any]:
    """Entry ``key`` of every old rank's state file (``rng_rank<r>.pt``), memory-mapped: the other
    entries (a rank's PowerSGD buffers) are not read."""
    states = []
    for r in range(world):
        state = torch.load(folder / f"rng_rank{r}.pt", map_location="cpu", mmap=True, weights_only=True)
        states.append(state.get(key))
    return states


def stream_state(folder: Path, old_world: int, trainer) -> dict[str, Any]:
    """This rank's stream position, re-dealt from every old rank's (``rng_rank<r>.pt``)."""
    from ..data import redeal_stream_states

    states = old_rank_states(folder, "data", old_world)
    return redeal_stream_states(states, trainer.world, trainer.cfg.data.workers)[trainer.rank]
