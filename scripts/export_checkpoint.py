#!/usr/bin/env python3
"""Export a training checkpoint (any ZeRO stage) to a folder with config.json + model.safetensors.

python scripts/export_checkpoint.py --checkpoint-dir runs/dalle/checkpoints --out export/ [--tag step00001000]
"""

import argparse
import sys

from dalle_ds.training.checkpointing import export_checkpoint


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint-dir", required=True, help="<output>/checkpoints of a training run")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest complete one)")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint_dir, args.out, args.tag)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
