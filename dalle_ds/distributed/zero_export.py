"""The consolidated fp32 weights of a DeepSpeed checkpoint, read a few tensors at a time.

DeepSpeed's ``zero_to_fp32`` builds the whole fp32 state dict in host memory: ZeRO 1/2 concatenate
every rank's flat partition into one vector (and first read the 16-bit module whole), so exporting
``dalle-12b`` needs about 49 GB of RAM, more during the copy. :class:`CheckpointWeights` keeps the
files memory-mapped and copies out only the tensors asked for:

- ZeRO 0: the module's own tensors, from the mapped model-states file (cast up to fp32);
- ZeRO 1/2: each parameter's span of its group's flat fp32 vector, sliced from the ranks' mapped
  partitions it crosses (the layout DeepSpeed records: group order, alignment paddings);
- ZeRO 3: each parameter gathered from every rank by DeepSpeed's own ``GatheredTensor``;
- a universal checkpoint (``<tag>/universal``, what a resume on another number of ranks converts
  to): each parameter's own ``zero/<name>/fp32.pt``.

Every :meth:`CheckpointWeights.read` maps the files afresh and drops the mapping when it returns,
so the pages it touched leave this process's memory with it: peak host memory is about what one
call returns, plus the tensor being assembled. Buffers come from the module; parameters DeepSpeed
reports as shared are read once per source.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from . import ds_adapter

__all__ = ["CheckpointWeights"]


class CheckpointWeights:
    """Names, shapes and (on demand) fp32 values of the weights in one checkpoint tag folder."""

    def __init__(self, tag_dir: str | Path):
        self.tag_dir = Path(tag_dir)
        path = ds_adapter.model_states_path(self.tag_dir)
        if path is None:
            raise FileNotFoundError(
                f"{self.tag_dir}: no {' or '.join(ds_adapter.MODEL_STATES)}: not a DeepSpeed checkpoint folder"
            )
        self.states_path = path
        layout = ds_adapter.mapped_model_states(path)
        states = layout["states"]
        self.client = {k: states.get(k) for k in ("model_config", "ds_config")}
        self.stage = int((states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
        self.shapes: dict[str, torch.Size] = {}
        self._where: dict[str, tuple] = {}  # name -> how to read it
        module = states.get("module") or {}
        for name in layout["buffer_names"]:
            if name in module:
                self._add(name, module[name].shape, ("module", name, module[name].dtype))
        universal = (self.tag_dir / "zero").is_dir()
        if universal:
            for name, shape in ((k, v) for group in layout["param_shapes"] for k, v in group.items()):
                if not (self.tag_dir / "zero" / name / "fp32.pt").is_file():
                    raise ValueError(f"{self.tag_dir}: universal checkpoint without zero/{name}/fp32.pt")
                self._add(name, shape, ("universal", name))
        elif self.stage == 0:
            for name, value in module.items():
                if name not in self.shapes:
                    self._add(name, value.shape, ("module", name, value.dtype))
        else:
            frozen = [n for n in layout["frozen_param_shapes"] if not n.startswith("dvae.")]
            if frozen:
                raise ValueError(f"{self.tag_dir}: frozen parameters {frozen[:3]} are not supported by the export")
            self._index_flat(layout["param_shapes"], *self._mapped_partitions())
        for name, source in layout["shared_params"].items():
            if source in self._where:
                self._add(name, self.shapes[source], ("shared", source))
        del layout, states, module

    def _add(self, name: str, shape, where: tuple) -> None:
        self.shapes[name] = torch.Size(shape)
        self._where[name] = where

    def _mapped_partitions(self) -> tuple[int, list, list | None]:
        stage, world, parts, paddings = ds_adapter.mapped_fp32_partitions(self.tag_dir)
        if stage != self.stage:
            raise ValueError(f"{self.tag_dir}: optimizer files say ZeRO-{stage}, the config ZeRO-{self.stage}")
        return world, parts, paddings

    def _index_flat(self, param_shapes: list[dict], world: int, parts: list, paddings) -> None:
        """Where each parameter lies in the flat fp32 partitions (checked against their sizes)."""
        if self.stage == 3:
            offset = 0
            shapes = {k: v for group in param_shapes for k, v in group.items()}
            for name, shape in shapes.items():
                per_rank, _ = _zero3_split(math.prod(shape), world)
                self._add(name, shape, ("zero3", offset))
                offset += per_rank
            held = sum(p.numel() for p in parts[0])
            if offset != held:
                raise ValueError(f"{self.tag_dir}: parameters take {offset} numels per rank, partitions hold {held}")
            return
        align = 2 * world  # ZeRO 1/2 pad each group's flat vector to a multiple of this
        for g, shapes in enumerate(param_shapes):
            offset, pads = 0, paddings[g] if paddings is not None else None
            for i, (name, shape) in enumerate(shapes.items()):
                numel = math.prod(shape)
                self._add(name, shape, ("flat", g, offset, numel))
                offset += numel + (pads[i] if pads is not None else 0)
            total = sum(rank_parts[g].numel() for rank_parts in parts)
            if align * math.ceil(offset / align) != align * math.ceil(total / align):
                raise ValueError(f"{self.tag_dir}: group {g} uses {offset} of {total} numels: layout mismatch")

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """fp32 copies (integer buffers keep their dtype) of ``names``, owning their memory."""
        names = list(names)
        unknown = [n for n in names if n not in self._where]
        if unknown:
            raise KeyError(f"{self.tag_dir}: no weights named {unknown[:5]}")
        wanted = {self._where[n][1] if self._where[n][0] == "shared" else n for n in names}
        kinds = {self._where[n][0] for n in wanted}
        out: dict[str, torch.Tensor] = {}
        states = ds_adapter.mapped_model_states(self.states_path)["states"] if "module" in kinds else None
        parts = self._mapped_partitions()[1] if kinds & {"flat", "zero3"} else None
        offsets = [0, *_cumsum(p.numel() for p in parts[0])] if parts is not None else None
        for name in wanted:
            kind, *where = self._where[name]
            if kind == "module":
                value = states["module"][where[0]]
                out[name] = value.to(torch.float32 if value.is_floating_point() else value.dtype, copy=True)
            elif kind == "flat":
                out[name] = _flat_slice([p[where[0]] for p in parts], *where[1:]).view(self.shapes[name])
            elif kind == "universal":
                path = self.tag_dir / "zero" / name / "fp32.pt"
                value = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
                value = value["param"] if isinstance(value, dict) else value  # ZeRO 1/2 wrap it, ZeRO-3 not
                out[name] = value.to(torch.float32, copy=True).view(self.shapes[name])
            else:
                out[name] = ds_adapter.zero3_gather(parts, offsets, where[0], self.shapes[name])[0].float()
        del states, parts
        gc.collect()  # the loaded pickles hold reference cycles: unmap the files now, not at some later GC
        return {n: out[self._where[n][1]] if self._where[n][0] == "shared" else out[n] for n in names}


def _flat_slice(rank_parts: list[torch.Tensor], offset: int, numel: int) -> torch.Tensor:
    """Elements ``offset .. offset + numel`` of the concatenation of ``rank_parts``, copied out."""
    chunks, start = [], 0
    for part in rank_parts:
        end = start + part.numel()
        lo, hi = max(offset, start), min(offset + numel, end)
        if lo < hi:
            chunks.append(part[lo - start : hi - start])
        start = end
    if sum(c.numel() for c in chunks) != numel:
        raise ValueError(f"flat span {offset}+{numel} runs past the partitions ({start} numels)")
    return torch.cat(chunks).float() if len(chunks) > 1 else chunks[0].to(torch.float32, copy=True)


def _zero3_split(numel: int, world: int) -> tuple[int, int]:
    """(numel each rank holds of a ZeRO-3 parameter, padding): DeepSpeed pads to a multiple of ranks."""
    per_rank = math.ceil(numel / world)
    return per_rank, per_rank * world - numel


def _cumsum(values) -> list[int]:
    out, total = [], 0
    for v in values:
        total += v
        out.append(total)
    return out
