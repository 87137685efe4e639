"""fp16 on DeepSpeed's CPU accelerator, for tests and benchmarks: where the CPU lacks native fp16
DeepSpeed refuses an fp16 config in one capability check although the arithmetic runs."""

from __future__ import annotations

import contextlib


def _fp16_supported(self) -> bool:
    return True


def force_fp16_on_cpu(cpu_accelerator: type) -> None:
    """Make DeepSpeed's CPU accelerator class report fp16 as supported for the rest of the process.

    Without native fp16 (``torch.ops.mkldnn._is_mkldnn_fp16_supported``) its ``is_fp16_supported`` says
    no and DeepSpeed refuses an fp16 config, though the arithmetic runs. For processes that must not
    import DeepSpeed to patch it (tests/launch_env/sitecustomize.py calls this as the class is defined)."""
    cpu_accelerator.is_fp16_supported = _fp16_supported


@contextlib.contextmanager
def allow_fp16_on_cpu():
    """Within the block, DeepSpeed's CPU accelerator reports fp16 as supported (:func:`force_fp16_on_cpu`)
    where it would refuse it; other accelerators are left alone. Yields whether it patched."""
    from unittest import mock

    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu" or acc.is_fp16_supported():
        yield False
        return
    with mock.patch.object(type(acc), "is_fp16_supported"):  # restores the original on exit
        force_fp16_on_cpu(type(acc))
        yield True
