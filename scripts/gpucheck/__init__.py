"""The checks behind ``scripts/gpu_check.py`` (the CLI), one concern per module:

- ``checks``: the check list (names, phases, timeouts, parameters);
- ``procs``: child process groups with timeouts and logs;
- ``context``: what a check worker gets (``Ctx``) and how it fails (``CheckFailed``);
- ``training_checks``, ``kernel_checks``, ``throughput``: the workers (train runs under the
  launcher; block-sparse attention and KV-cache sampling; tokens/s and MFU);
- ``worker``: one check in its own process, its result JSON;
- ``report``: the PASS/FAIL records and the JSON report;
- ``runner``: the orchestrating process (device probe, one worker process per check).

Modules import torch and dalle_ds models inside the workers, so ``--list`` and the orchestrator
stay light and never create a CUDA context.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: ds_configs/, scripts/
CLI = ROOT / "scripts" / "gpu_check.py"  # workers run as `python scripts/gpu_check.py --worker NAME`
