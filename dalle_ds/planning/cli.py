"""``scripts/plan_run.py``: the dry run of a training run on a cluster, before anyone rents it."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..distributed.ds_config import DeepSpeedConfigError, load_ds_config
from ..models.config import (
    TOKENIZER_KINDS,
    ConfigError,
    DalleConfig,
    DVAEConfig,
    VQGANConfig,
    config_from_dict,
    load_config,
)
from ..training.errors import UsageError
from .layout import Layout, parse_bytes
from .plan import plan_run
from .report import format_plan

__all__ = ["main", "parser"]

DESCRIPTION = """Dry run of a DALL-E training run: per-rank GPU memory by component, host memory at
start-up and bytes sent per optimizer step (intra- and inter-node), for a preset, a DeepSpeed config
and a cluster layout. Nothing is allocated: the model is built on the meta device.

    python scripts/plan_run.py --preset dalle-12b --deepspeed_config ds_configs/zero2_fp16_powersgd.json \\
        --nodes 16 --gpus-per-node 8 --gpu-memory 80GB --micro-batch-size 1 [--grad-accum A] [--json]

With --json the last line is one JSON object (fits, total_bytes, components, host_bytes_at_start,
intra_node_bytes_per_step, inter_node_bytes_per_step, ...). Sizes: GB = 10^9 bytes, GiB = 2^30."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", required=True, help="DALL-E preset name or YAML model config (as the trainers take)")
    p.add_argument("--deepspeed_config", "--deepspeed-config", required=True, help="DeepSpeed JSON config")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory", default="80GB", help="memory per GPU, e.g. 80GB, 16GB, 79.6GiB")
    p.add_argument("--micro-batch-size", type=int, default=1, help="examples per GPU per micro batch")
    p.add_argument("--grad-accum", type=int, default=None, help="micro batches per optimizer step")
    p.add_argument(
        "--dvae",
        default="dvae-paper",
        help="the frozen dVAE that encodes images on the fly: a preset, YAML or model folder (default dvae-paper)",
    )
    p.add_argument("--precomputed-codes", action="store_true", help="images encoded beforehand: no dVAE on the GPU")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object on the last line")
    return p


def _dvae_config(spec: str) -> DVAEConfig | VQGANConfig:
    """The image tokenizer's config (a dVAE or a VQGAN): a preset, a YAML or a model folder."""
    path = Path(spec)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise UsageError(f"--dvae {spec}: no config.json in the folder")
        try:
            return config_from_dict(json.loads(config_file.read_text()), str(config_file), TOKENIZER_KINDS)
        except ConfigError as err:
            raise UsageError(f"--dvae {spec}: {err}") from None
    config = load_config(spec)
    if config.kind not in TOKENIZER_KINDS:
        raise UsageError(f"--dvae {spec}: not an image tokenizer config (dVAE or VQGAN): {type(config).__name__}")
    return config


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        config = load_config(args.preset)
        if not isinstance(config, DalleConfig):
            raise UsageError(f"--preset {args.preset}: the planner plans DALL-E runs; got a {type(config).__name__}")
        dvae = None if args.precomputed_codes else _dvae_config(args.dvae)
        if dvae is not None and (dvae.grid_size, dvae.codebook_size) != (config.image_grid, config.image_vocab_size):
            raise UsageError(
                f"--dvae {args.dvae}: grid {dvae.grid_size} and codebook {dvae.codebook_size} do not fit --preset "
                f"{args.preset} (image_grid={config.image_grid}, image_vocab_size={config.image_vocab_size})"
            )
        layout = Layout(
            args.nodes, args.gpus_per_node, parse_bytes(args.gpu_memory), args.micro_batch_size, args.grad_accum
        )
        raw = load_ds_config(args.deepspeed_config)
        plan = plan_run(config, raw, layout, preset=args.preset, dvae=dvae, source=args.deepspeed_config)
    except (UsageError, ConfigError, DeepSpeedConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_plan(plan, args.deepspeed_config))
    if args.json:
        print(json.dumps(plan.to_dict()))
    return 0
