#!/usr/bin/env python3
"""Dry run of a DALL-E training run on a cluster (memory per rank by component, bytes per step).

    python scripts/plan_run.py --preset dalle-12b --deepspeed_config ds_configs/zero2_fp16_powersgd.json \
        --nodes 16 --gpus-per-node 8 --gpu-memory 80GB --micro-batch-size 1 --json

See docs/planning.md; the logic lives in dalle_ds.planning.
"""

import sys

from dalle_ds.planning.cli import main

if __name__ == "__main__":
    sys.exit(main())
