"""``python -m dalle_ds.checks``: the GPU acceptance check (``scripts/gpu_check.py`` takes the same arguments)."""

import sys

from .cli import main

sys.exit(main(prog="python -m dalle_ds.checks"))
