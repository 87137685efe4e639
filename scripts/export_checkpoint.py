#!/usr/bin/env python3
"""Export a training checkpoint (any ZeRO stage) to a folder with config.json + safetensors weights.

python scripts/export_checkpoint.py --checkpoint-dir runs/dalle/checkpoints --out export/ \\
    [--tag step00001000] [--max-shard-size 5GB]

Weights are read from the checkpoint and written one shard at a time, so host memory stays near one
shard whatever the model's size: one model.safetensors up to --max-shard-size, else Hugging Face
shards (model-00001-of-0000N.safetensors ...) and model.safetensors.index.json.
"""

import argparse
import sys

from dalle_ds.inference.serialization import shard_size
from dalle_ds.training.checkpointing import export_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-dir", required=True, help="<output>/checkpoints of a training run")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    parser.add_argument("--max-shard-size", type=shard_size, default="5GB", help="e.g. 5GB, 500MiB; 'none': one file")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint_dir, args.out, args.tag, args.max_shard_size)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
