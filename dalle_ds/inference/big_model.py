"""Pipelines larger than one device: layers placed on several GPUs, the CPU and disk by ``accelerate``.

:func:`load_pipeline_dispatched` builds the transformer with empty weights (no memory), lets
``accelerate`` place its residual blocks (``infer_auto_device_map``, never splitting a block) within
``max_memory``, then loads the checkpoint (single file or shards) straight into place
(``load_checkpoint_and_dispatch``). Blocks that do not fit go to the CPU and then to
``offload_folder`` on disk; hooks bring each one's weights to its execution device for its forward.
Blocks placed on the CPU or disk run on the main device, which therefore keeps room for one block
once anything is offloaded (as does the CPU, which stages blocks read from disk).

The embeddings, the final norm and the output head always sit on the main device (the first GPU
in the map, else the CPU): sampling reads their weights directly, outside a module call, and they
are a small part of the model (``dalle-12b``: 0.2B of 12B parameters). The dVAE goes there too.

``device_map``: ``auto`` (= ``balanced``: blocks spread evenly over the GPUs), ``balanced``,
``balanced_low_0`` (GPU 0 kept light for the sampling loop), ``sequential`` (fill GPU 0, then 1,
...), or an explicit ``{module name: device}`` dict.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..models.dalle import DALLE
from ..models.init import no_weight_init
from .serialization import CONFIG_NAME, INDEX_NAME, model_from_config, weight_files

__all__ = [
    "DEVICE_MAPS",
    "DTYPES",
    "add_loading_args",
    "default_device",
    "infer_device_map",
    "load_pipeline_dispatched",
    "load_pipeline_from_args",
    "parse_max_memory",
]

DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NO_SPLIT = ["Block"]  # a residual block (attention + MLP) is never split across devices


def parse_max_memory(text: str | None) -> dict[int | str, int] | None:
    """``"0=20GiB,1=20GiB,cpu=64GiB"`` -> ``{0: 20 * 2**30, 1: ..., "cpu": 64 * 2**30}`` bytes (plain
    numbers are bytes; None or "": all free memory of every device)."""
    from accelerate.utils import convert_file_size_to_int

    if not text:
        return None
    out: dict[int | str, int] = {}
    for item in text.split(","):
        device, sep, size = item.partition("=")
        device, size = device.strip(), size.strip()
        if not sep or not size or not (device.isdigit() or device in ("cpu", "mps", "xpu")):
            raise ValueError(f"max memory {item!r}: expected DEVICE=SIZE, e.g. 0=20GiB or cpu=64GiB")
        try:
            nbytes = convert_file_size_to_int(int(size) if size.isdigit() else size)
        except ValueError:
            raise ValueError(f"max memory {item!r}: size {size!r} is not bytes or a size like 20GiB or 500MB") from None
        out[int(device) if device.isdigit() else device] = nbytes
    return out


def infer_device_map(model: DALLE, device_map="auto", max_memory=None, dtype=None) -> dict[str, int | str]:
    """``{module name: device}`` for ``model`` (built with empty weights): every module outside
    ``blocks`` on the main device, whose budget is reduced by their size, and ``accelerate``'s
    placement of the blocks in what is left. Every block gets its own entry, so each has the hook
    that moves its input and (if offloaded) its weights to where it runs."""
    from accelerate.utils import compute_module_sizes, get_balanced_memory, get_max_memory, infer_auto_device_map

    blocks = [f"blocks.{i}" for i in range(len(model.blocks))]
    if isinstance(device_map, dict):
        placed = {}
        for name, device in device_map.items():
            placed.update(dict.fromkeys(blocks, device) if name == "blocks" else {name: device})
        return placed
    if device_map not in DEVICE_MAPS:
        raise ValueError(f"device_map={device_map!r}: expected one of {DEVICE_MAPS} or a dict")
    budget = get_max_memory(None if max_memory is None else dict(max_memory))  # bytes; all visible devices if None
    gpus = [d for d in budget if isinstance(d, int)]
    main = gpus[0] if gpus else "cpu"
    sizes = compute_module_sizes(model, dtype=dtype)
    outside = sizes[""] - sizes["blocks"] - sizes.get("dvae", 0)
    if budget.get(main, 0) < outside:
        raise ValueError(
            f"max_memory={max_memory}: the embeddings, final norm and head need {outside:,} bytes on the "
            f"main device {main!r}, which is given {budget.get(main, 0):,}"
        )
    budget[main] -= outside
    split = {"no_split_module_classes": NO_SPLIT, "dtype": dtype}
    if device_map != "sequential":
        budget = get_balanced_memory(model.blocks, budget, low_zero=device_map == "balanced_low_0", **split)
    placed = {name: main for name, _ in model.named_children() if name not in ("blocks", "dvae")}
    for name, device in infer_auto_device_map(model.blocks, budget, **split).items():
        if name:
            placed[f"blocks.{name}"] = device
        else:  # all blocks on one device
            placed.update(dict.fromkeys(blocks, device))
    return placed


def load_pipeline_dispatched(
    directory, device_map="auto", max_memory=None, offload_folder=None, dtype: torch.dtype | None = None
):
    """(DALLE spread over devices with its dVAE attached, tokenizer) from a pipeline folder.

    ``max_memory``: ``{device: size}`` (``parse_max_memory``); ``offload_folder``: where blocks
    that fit nowhere are written and read back from, one at a time; ``dtype``: cast the weights
    (e.g. ``torch.bfloat16`` halves the memory; logits stay fp32)."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    from .generation import attach_pipeline_parts

    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing: not a pipeline folder")
    files = weight_files(directory)  # names a missing shard before accelerate does
    with init_empty_weights(), no_weight_init():
        model = model_from_config(json.loads(config_path.read_text()), source=str(config_path))
    if not isinstance(model, DALLE):
        raise ValueError(f"{directory}: holds a {type(model).__name__}, not a DALL-E transformer")
    placement = infer_device_map(model, device_map, max_memory, dtype)
    if "disk" in placement.values() and offload_folder is None:
        raise ValueError(
            f"the model does not fit in max_memory={max_memory}: {sum(d == 'disk' for d in placement.values())} "
            "blocks would go to disk; pass an offload folder (--offload-folder) or more memory"
        )
    checkpoint = directory / INDEX_NAME if (directory / INDEX_NAME).is_file() else files[0]
    model = load_checkpoint_and_dispatch(
        model,
        str(checkpoint),
        device_map=placement,
        offload_folder=None if offload_folder is None else str(offload_folder),
        no_split_module_classes=NO_SPLIT,
        dtype=dtype,
        strict=True,
    )
    model, tokenizer = attach_pipeline_parts(directory, model.eval(), model.text_emb.weight.device)
    return model, tokenizer  # model.hf_device_map: the placement (set by accelerate)


def default_device(requested: str | None = None) -> str:
    """``requested``, else the GPU when there is one, else the CPU."""
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


def add_loading_args(p: argparse.ArgumentParser) -> None:
    """The options of scripts that sample from a pipeline folder: where and in which dtype it runs."""
    p.add_argument("--device", default=None, help="cuda if available, else cpu (without --device-map)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="transformer weights (the dVAE stays fp32)")
    p.add_argument("--device-map", default=None, help=f"{'|'.join(DEVICE_MAPS)}: spread the blocks over devices")
    p.add_argument("--max-memory", default=None, help="with --device-map: e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    p.add_argument("--offload-folder", default=None, help="with --device-map: where blocks that fit nowhere go")


def load_pipeline_from_args(p: argparse.ArgumentParser, args: argparse.Namespace):
    """(model, tokenizer) from ``args.checkpoint`` as :func:`add_loading_args`' options say; sets
    ``args.device`` to the main device (where the sampling loop, the dVAE and the inputs go)."""
    from .generation import load_pipeline

    if args.device_map is None and (args.max_memory or args.offload_folder):
        p.error("--max-memory and --offload-folder place layers: they need --device-map")
    dtype = DTYPES[args.dtype]
    if args.device_map:
        if args.device:
            p.error("--device and --device-map exclude each other: the map's first GPU is the main device")
        try:
            max_memory = parse_max_memory(args.max_memory)
        except ValueError as e:
            p.error(str(e))
        model, tokenizer = load_pipeline_dispatched(
            args.checkpoint, args.device_map, max_memory, args.offload_folder, dtype
        )
    else:
        model, tokenizer = load_pipeline(args.checkpoint, map_location=default_device(args.device))
        model.to(dtype).dvae.float()
    args.device = str(model.text_emb.weight.device)
    return model, tokenizer
