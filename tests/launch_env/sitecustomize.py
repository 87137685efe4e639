"""Test-only process setup for ranks started by the `deepspeed` launcher (never shipped).

Tests put this folder on PYTHONPATH; Python imports ``sitecustomize`` at start-up in every rank
(ranks forked by tests/rank_server.py run :func:`install` themselves).

- ``DALLE_DS_TEST_FP16_ON_CPU=1``: DeepSpeed refuses fp16 on the CPU accelerator in one capability
  check (``is_fp16_supported``) although the arithmetic runs; patch that check once DeepSpeed's CPU
  accelerator module is imported (lazily: nothing is imported here).
- ``DALLE_DS_TEST_RECORD_COLLECTIVES=DIR``: record every torch.distributed call made from dalle_ds
  code (op, caller, tensor devices, the group's backends) into ``DIR/rank<R>.jsonl``.
"""

import importlib.abc
import importlib.util
import os
import sys

_CPU_ACCELERATOR = "deepspeed.accelerator.cpu_accelerator"


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    def __init__(self, name, patch):
        self.name, self.patch = name, patch

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        exec_module, patch = spec.loader.exec_module, self.patch

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _fp16_on_cpu(module):
    from dalle_ds.distributed.ds_adapter import force_fp16_on_cpu

    force_fp16_on_cpu(module.CPU_Accelerator)


def _when_imported(name, patch):
    if name in sys.modules:  # a rank forked from a process that imported it already (tests/rank_server.py)
        patch(sys.modules[name])
    else:
        sys.meta_path.insert(0, _PatchAfterImport(name, patch))


def install():
    """Apply what the environment asks for: at interpreter start-up (this file as ``sitecustomize``)
    or in a rank forked from a process that has imported torch and DeepSpeed already."""
    if os.environ.get("DALLE_DS_TEST_FP16_ON_CPU") == "1":
        _when_imported(_CPU_ACCELERATOR, _fp16_on_cpu)
    if os.environ.get("DALLE_DS_TEST_RECORD_COLLECTIVES"):
        import collective_recorder

        _when_imported("torch.distributed", collective_recorder.install)


install()
