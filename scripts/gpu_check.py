#!/usr/bin/env python3
"""One-GPU acceptance check of dalle-ds (``bash scripts/gpu_check.sh``): the command line of
``dalle_ds.checks`` (``--help`` lists the checks).

    python scripts/gpu_check.py [--out outputs/gpu_check/report.json] [--only train,attention] [--jobs 4]
    python scripts/gpu_check.py --list          # the checks, no GPU needed
    python scripts/gpu_check.py --cpu-smoke     # the checks' code at tiny sizes on the CPU (CI)
"""

import sys

from dalle_ds.checks.cli import main

if __name__ == "__main__":
    sys.exit(main())
