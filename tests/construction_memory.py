"""Helper process of tests/test_construction.py: build a DALL-E one way and report host memory.

    python construction_memory.py eager|meta <dtype>

The model: dalle-small widened to d_model 1024 and 6 layers (77M parameters, 310 MB in fp32).

``eager``: ``DALLE(config)`` in fp32, then cast to ``dtype`` as the DeepSpeed engine casts it (what the
trainer did before models were built on the meta device); ``meta``: built under ``meta_modules()``
and materialised on the CPU in ``dtype``. After the imports and a warm-up build of a small model the
kernel's peak-RSS mark is reset (``/proc/self/clear_refs``); prints one JSON line: the peak resident
memory above the resident memory before the build (``growth``), the model's bytes in ``dtype``
(``model``) and in fp32 (``fp32``), and its largest module's fp32 bytes (``largest_module``).
"""

import json
import sys
from pathlib import Path

import torch

from dalle_ds.models.config import load_config
from dalle_ds.models.dalle import DALLE
from dalle_ds.models.init import materialise, meta_modules

SIZE = {"d_model": 1024, "n_layers": 6}


def status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def build(config, how: str, dtype: torch.dtype) -> DALLE:
    torch.manual_seed(0)
    if how == "eager":
        return DALLE(config).to(dtype)
    with meta_modules():
        model = DALLE(config)
    return materialise(model, "cpu", dtype)


def main(how: str, dtype_name: str) -> None:
    dtype = getattr(torch, dtype_name)
    config = load_config("dalle-small", **SIZE)
    build(load_config("dalle-tiny"), how, dtype)  # first-call costs (allocator, kernels) out of the way
    Path("/proc/self/clear_refs").write_text("5")  # the peak mark (VmHWM) restarts from the current RSS
    start = status_bytes("VmRSS")
    model = build(config, how, dtype)
    growth = status_bytes("VmHWM") - start
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    numel = sum(p.numel() for p in model.parameters())
    print(json.dumps({"growth": growth, "model": numel * dtype.itemsize, "fp32": numel * 4,
                      "largest_module": largest * 4}))  # fmt: skip


if __name__ == "__main__":
    main(*sys.argv[1:])
