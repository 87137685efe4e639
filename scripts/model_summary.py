#!/usr/bin/env python3
"""Per-module parameter table of a preset or YAML config, built on the meta device (no memory).

    python scripts/model_summary.py --preset dalle-12b [--depth 2]

The last line is ``total_parameters=<int>``.
"""

import argparse
import sys
from collections import OrderedDict

import torch

from dalle_ds import load_config
from dalle_ds.models.init import meta_modules
from dalle_ds.models.tokenizer import build_model


def summarize(model: torch.nn.Module, depth: int) -> "OrderedDict[str, int]":
    """Parameter counts grouped by the first ``depth`` components of the name (layers collapsed)."""
    rows: OrderedDict[str, int] = OrderedDict()
    for name, p in model.named_parameters():
        parts = name.split(".")[:-1] or [name]
        key = ".".join("*" if part.isdigit() else part for part in parts[:depth])
        rows[key] = rows.get(key, 0) + p.numel()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, help="preset name or YAML config path")
    parser.add_argument("--depth", type=int, default=3, help="name components per row (digits collapse to *)")
    args = parser.parse_args(argv)
    config = load_config(args.preset)
    with meta_modules():
        model = build_model(config)
    rows = summarize(model, args.depth)
    width = max(len(k) for k in rows)
    total = sum(rows.values())
    print(f"{args.preset}: {type(model).__name__}")
    print(f"{'module':<{width}}  {'parameters':>15}  {'share':>7}")
    for key, n in rows.items():
        print(f"{key:<{width}}  {n:>15,}  {100 * n / total:>6.2f}%")
    print(f"total_parameters={total}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
