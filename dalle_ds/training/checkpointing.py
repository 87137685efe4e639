"""Training checkpoints: the format, crash-safe saving, exact resume, and export to safetensors.

A checkpoint is a folder ``<output>/checkpoints/stepNNNNNNNN`` holding

- the DeepSpeed engine's files (module, optimizer and scheduler states, every ZeRO partition) with
  the trainer's client state (step, ``model_config``, ...) inside the model-states file;
- ``rng_rank{r}.pt`` per rank: every RNG state of that process and device (torch, CUDA, Python,
  numpy, DeepSpeed's activation-checkpointing tracker) plus the rank's own training state (the
  communication hook's error-feedback buffers, the data stream's position and counters);
- ``trainer_state.pt`` (rank 0): state the trainer keeps outside the engine (e.g. the dVAE EMA);
- ``run_config.yaml`` and ``ds_config.json`` (rank 0): the run's resolved settings and the prepared
  DeepSpeed JSON it trained with (the same, unprepared JSON and the run config are also in the client
  state, where ``--resume`` compares them with the resumed run's);
- ``complete.json``, written by rank 0 after every rank has finished writing (a barrier), and only
  then ``latest`` is pointed at it: the client state plus ``format`` (:data:`FORMAT`) and every
  other file's size and the SHA-256 of each 1 GiB piece of it (``files``; the ranks hash the pieces
  between them, so a 24 GB model-states file takes 24 ranks about a second). A crash
  at any moment leaves the previous complete checkpoint as the one ``--resume`` picks.

``--resume`` verifies a checkpoint before loading it (sizes and digests, the files shared among the
ranks again) and loads the newest intact one; every newer folder (incomplete, or damaged: a file
missing, truncated or changed) is reported by file name and moved to ``<checkpoints>/set_aside/``,
so that pruning and later saves never mistake it for a good one. When none is intact the run stops
with what was checked and nothing is moved or deleted.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..distributed import collectives as dd
from ..distributed import ds_adapter
from ..distributed.zero_export import CheckpointWeights
from ..inference.serialization import model_from_config, save_weights, write_config
from ..models.config import ConfigError
from ..models.init import meta_modules
from ..utils.files import atomic_write_text
from . import reshard
from .integrity import COMPLETE, FORMAT, CheckpointError, manifest, verify_folder

__all__ = [
    "COMPLETE",
    "FORMAT",
    "CheckpointError",
    "Checkpointer",
    "capture_rng_state",
    "export_checkpoint",
    "latest_complete_tag",
    "restore_rng_state",
]

SET_ASIDE = "set_aside"  # where --resume moves checkpoints newer than the one it loads
TAG = re.compile(r"step\d+$")


def _tag_step(tag: str) -> int:
    return int(tag[4:])


def latest_complete_tag(ckpt_dir: str | Path) -> str | None:
    """The tag ``latest`` names if that checkpoint is complete, else the newest complete one."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        if (ckpt_dir / tag / COMPLETE).exists():
            return tag
    complete = sorted(p.name for p in ckpt_dir.glob("step*") if (p / COMPLETE).exists())
    return complete[-1] if complete else None


class Checkpointer:
    """Saves and loads one run's checkpoints (collective: every rank calls :meth:`save` / :meth:`load`)."""

    def __init__(self, ckpt_dir: str | Path, rank: int, keep: int, log: Callable[[str], None] = lambda msg: None):
        self.dir = Path(ckpt_dir)
        self.log = log
        self.rank = rank
        self.keep = keep
        self.skipped: list[tuple[str, list[str]]] = []  # what the last load stepped over
        self.unverified = False  # the last load's checkpoint predates checksums
        self._chosen: tuple[str | None, dict[str, Any] | None] | None = None  # what choose() found

    def latest_tag(self) -> str | None:
        return latest_complete_tag(self.dir)

    def save(
        self,
        engine,
        step: int,
        client: dict[str, Any],
        rank_state: dict[str, Any],
        shared_state: dict[str, Any],
        before_complete: Callable[[], None] = lambda: None,
        files: dict[str, Path] | None = None,
    ) -> str:
        """Write checkpoint ``step``: the engine with ``client`` state, this rank's RNG states and
        ``rank_state``, rank 0's ``shared_state`` and copies of ``files`` (name -> source: the run
        config and DeepSpeed JSON); mark it complete once every rank is done; prune."""
        tag = f"step{step:08d}"
        engine.save_checkpoint(str(self.dir), tag=tag, client_state=client, save_latest=False)
        torch.save({**capture_rng_state(), **rank_state}, self.dir / tag / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            torch.save(shared_state, self.dir / tag / "trainer_state.pt")
            for name, source in (files or {}).items():
                atomic_write_text(self.dir / tag / name, Path(source).read_text())
        before_complete()
        dd.barrier()
        folder = self.dir / tag
        files = manifest(folder)
        if self.rank == 0:
            marker = {**client, "format": FORMAT, "files": dict(sorted(files.items()))}
            atomic_write_text(folder / COMPLETE, json.dumps(marker) + "\n")
            atomic_write_text(self.dir / "latest", tag)
            complete = sorted(p for p in self.dir.glob("step*") if (p / COMPLETE).exists())
            for old in complete[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        dd.barrier()
        return tag

    def verify(self, tag: str) -> list[str] | None:
        """:func:`.integrity.verify_folder` of checkpoint ``tag`` (collective)."""
        return verify_folder(self.dir / tag)

    def newest_intact(self) -> tuple[str | None, list[tuple[str, list[str]]]]:
        """The newest checkpoint that passes :meth:`verify` and the newer ones it steps over with
        their problems (collective). Raises :class:`CheckpointError` when some checkpoint was
        completed but none is intact; (None, skipped) when none was ever completed."""
        tags = sorted((p.name for p in self.dir.glob("step*") if p.is_dir() and TAG.match(p.name)), key=_tag_step)
        skipped: list[tuple[str, list[str]]] = []
        for tag in reversed(tags):
            problems = self.verify(tag)
            if not problems:
                self.unverified = problems is None
                return tag, skipped
            skipped.append((tag, problems))
        if any((self.dir / t / COMPLETE).exists() for t, _ in skipped):
            checked = "\n".join(f"  {t}: {p}" for t, problems in skipped for p in problems)
            raise CheckpointError(
                f"--resume: no intact checkpoint in {self.dir}; checked, newest first:\n{checked}\n"
                f"Nothing was moved or deleted. Restore a copy of a checkpoint, or start without --resume "
                f"in another --output-dir."
            )
        return None, skipped

    def choose(self) -> tuple[str, dict[str, Any]] | None:
        """The checkpoint ``--resume`` loads: (tag, its marker), or None when none was ever completed.
        Collective the first time (:meth:`newest_intact`, logged); the trainer asks before it builds
        the engine (a checkpoint of another number of ranks sets the gradient accumulation)."""
        if self._chosen is None:
            start = time.perf_counter()
            tag, self.skipped = self.newest_intact()
            seconds = time.perf_counter() - start
            for old, problems in self.skipped:
                self.log(f"--resume: {old} stepped over and moved to {self.dir / SET_ASIDE}/: " + "; ".join(problems))
            marker = None
            if tag is not None:
                how = "written before checksums, not verified" if self.unverified else "verified"
                self.log(f"--resume: {tag} {how} in {seconds:.1f} s")
                marker = json.loads((self.dir / tag / COMPLETE).read_text())
            self._chosen = (tag, marker)
        tag, marker = self._chosen
        return None if tag is None else (tag, marker)

    def load(
        self, engine, check: Callable[[Path, dict[str, Any]], None] = lambda folder, marker: None
    ) -> tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]] | None:
        """Load the newest intact checkpoint (:meth:`choose`) into ``engine`` and restore this rank's
        RNG states; the newer folders it stepped over (:attr:`skipped`: tag and problems) are moved to
        ``set_aside/`` (also when none was ever completed) and ``latest`` names the loaded one.

        ``check(folder, marker)`` sees the chosen checkpoint's marker (the client state it was saved
        with) before anything is loaded or moved, and raises if it does not fit the run. A ZeRO
        checkpoint of another number of ranks is loaded through its universal form
        (``training/reshard.py``); this rank then takes old rank ``rank % old ranks``'s state (the
        trainer keeps what still applies).

        Returns (tag, client state, this rank's state, rank 0's shared state), or None when no
        checkpoint was ever completed.
        """
        chosen = self.choose()
        if chosen is None:
            self._set_skipped_aside(None)
            return None
        tag, marker = chosen
        folder = self.dir / tag
        check(folder, marker)
        old_world, world = marker.get("world_size", dd.world_size()), dd.world_size()
        if old_world != world and any(folder.glob("*zero_pp_rank_*_optim_states.pt")):
            universal = reshard.universal_copy(folder, self.rank, self.log)
            _, client = ds_adapter.load_universal(engine, folder, universal.name)
        else:
            _, client = engine.load_checkpoint(str(self.dir), tag=tag)
        rank_state: dict[str, Any] = {}
        path = folder / f"rng_rank{self.rank % old_world}.pt"
        if path.exists():  # RNG states live on the host; mapped: what the trainer leaves unused is not read
            rank_state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            restore_rng_state(rank_state)
        shared = folder / "trainer_state.pt"
        shared_state = torch.load(shared, weights_only=True) if shared.exists() else {}
        self._set_skipped_aside(tag)
        return tag, client, rank_state, shared_state

    def _set_skipped_aside(self, tag: str | None) -> None:
        """Move the folders the load stepped over to ``set_aside/`` and point ``latest`` at ``tag``
        (collective: every rank has read what it needs before anything moves)."""
        dd.barrier()
        if self.rank == 0:
            for old, _ in self.skipped:
                _set_aside(self.dir, old)
            latest = self.dir / "latest"
            if tag is not None and latest.exists() and latest.read_text().strip() != tag:
                atomic_write_text(latest, tag)
        dd.barrier()


def _set_aside(ckpt_dir: Path, tag: str) -> Path:
    """Move ``ckpt_dir/tag`` to ``ckpt_dir/set_aside/tag`` (``tag.1``, ... if taken); returns where."""
    target = ckpt_dir / SET_ASIDE / tag
    n = 0
    while target.exists():
        n += 1
        target = ckpt_dir / SET_ASIDE / f"{tag}.{n}"
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(ckpt_dir / tag, target)
    return target


def capture_rng_state() -> dict[str, Any]:
    """Every random generator a training step draws from, on every device of this process."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device (the current one)
    tracked = ds_adapter.rng_tracker_states()
    if tracked:
        state["ds_checkpointing"] = tracked
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Undo :func:`capture_rng_state` (keys it did not write are ignored)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]  # random.setstate needs tuples; a loaded state has lists
    random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:
            warnings.warn("the checkpoint holds a CUDA RNG state but CUDA is not available here", stacklevel=2)
    if "ds_checkpointing" in state:
        ds_adapter.set_rng_tracker_states(state["ds_checkpointing"])


TRAINING_ONLY = ("dvae.", "loss.")
"""Weights a run trains with that its export leaves out: the DALL-E run's frozen dVAE (saved on its
own) and the VQGAN run's discriminator (taming's ``loss.*``)."""


def export_checkpoint(
    ckpt_dir: str | Path, out_dir: str | Path, tag: str | None = None, max_shard_size: int | str | None = "5GB"
) -> Path:
    """Consolidate a dalle-ds DeepSpeed checkpoint (any ZeRO stage) into ``out_dir``, streaming.

    ZeRO 1-3: the fp32 master weights; ZeRO 0: the module's weights as trained (fp32 runs are exact,
    16-bit ones are cast up). Weights are read and written one shard at a time
    (``zero_export.CheckpointWeights``): a single ``model.safetensors`` up to ``max_shard_size``
    (``None``: never split), else Hugging Face shards + ``model.safetensors.index.json``, so host
    memory peaks at about a shard plus a layer whatever the model's size. The model config comes
    from the checkpoint itself; a frozen dVAE attached during training and a VQGAN's discriminator
    are not included (``TRAINING_ONLY``).
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_complete_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint (no step*/{COMPLETE})")
    weights = CheckpointWeights(ckpt_dir / tag)
    data = weights.client["model_config"]
    if not isinstance(data, dict):
        raise ConfigError(f"{weights.states_path}: no model_config in the client state (not written by dalle-ds?)")
    with meta_modules():
        model = model_from_config(data, source=str(weights.states_path))
    order = {k: v for k, v in model.state_dict().items() if not k.startswith(TRAINING_ONLY)}  # layers stay together
    missing, unexpected = sorted(set(order) - set(weights.shapes)), sorted(set(weights.shapes) - set(order) - {
        k for k in weights.shapes if k.startswith(TRAINING_ONLY)})  # fmt: skip
    wrong = [k for k, v in order.items() if k in weights.shapes and weights.shapes[k] != v.shape]
    if missing or unexpected or wrong:
        raise ConfigError(
            f"{ckpt_dir / tag} does not match its model_config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shape {wrong[:5]}"
        )
    shapes = {k: (v.shape, torch.float32 if v.is_floating_point() else v.dtype) for k, v in order.items()}
    save_weights(out_dir, shapes, weights.read, max_shard_size)
    return write_config(model.config.to_dict(), out_dir)
