"""The one-GPU acceptance check (``scripts/gpu_check.sh``, ``python -m dalle_ds.checks``), one
concern per module:

- ``cli``: the command line (``main``): list, select and run the checks, or be one check's worker;
- ``checks``: the check list (names, phases, timeouts, parameters);
- ``procs``: child process groups with timeouts and logs;
- ``context``: what a check worker gets (``Ctx``) and how it fails (``CheckFailed``);
- ``training_checks``, ``kernel_checks``, ``sampling_checks``, ``throughput``: the workers (train runs
  under the launcher; block-sparse attention and KV-cache sampling; a saved pipeline sampled the ways
  users sample it; the DALL-E trainer's tokens/s, MFU and peak memory against the dry run);
- ``flops``: the model FLOPs of a training step and the GPUs' peak bf16 FLOP/s (MFU's two sides);
- ``fixed_batch_trainer``: the DALL-E trainer on one in-process batch of codes (the throughput run);
- ``worker``: one check in its own process, its result JSON;
- ``report``: the PASS/FAIL records and the JSON report;
- ``runner``: the orchestrating process (device probe, one worker process per check).

Modules import torch and dalle_ds models inside the workers, so ``--list`` and the orchestrator
stay light and never create a CUDA context. The train checks run the repository's
``scripts/train_*.py`` with its ``ds_configs/``: the check runs from a checkout (the editable
install ``scripts/env.sh`` makes). Nothing else in dalle_ds imports this package.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: ds_configs/, scripts/
WORKER = [sys.executable, "-m", "dalle_ds.checks"]  # workers run as `python -m dalle_ds.checks --worker NAME`
