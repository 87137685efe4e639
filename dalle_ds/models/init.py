"""Building modules without initialising their weights: on the meta device (sizes only, or weights
given later one module at a time by :func:`materialise`) or when loaded weights replace them next.

torch's weight initialisers on meta tensors run Python reference kernels whose first call imports
``torch._dynamo`` (about 2-3 s per process on a small CPU), although a meta tensor holds no values
to initialise. :func:`no_weight_init` turns the initialisers into no-ops while modules are built.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator

import torch

__all__ = ["materialise", "meta_modules", "no_weight_init"]

_INITIALISERS = (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
    "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_",
)  # fmt: skip


@contextlib.contextmanager
def no_weight_init() -> Iterator[None]:
    """Within the block, ``torch.nn.init``'s initialisers return their tensor untouched (what
    modules' ``reset_parameters`` and our own init code call). Weights built here are
    uninitialised: use it on the meta device, or when every weight is loaded afterwards."""
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS}
    try:
        for name in saved:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


@contextlib.contextmanager
def meta_modules() -> Iterator[None]:
    """Build modules on the meta device (no memory, no initialisation): for sizes, plans, and
    models whose weights are assigned from a file next."""
    with torch.device("meta"), no_weight_init():
        yield


@contextlib.contextmanager
def _allocated(module: torch.nn.Module, device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """Give ``module``'s own meta parameters uninitialised storage on ``device`` (floating-point
    ones in ``dtype``) for the block that initialises them."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.is_meta:
            kind = dtype if dtype is not None and param.is_floating_point() else param.dtype
            data = torch.empty(param.shape, device=device, dtype=kind)
            setattr(module, name, torch.nn.Parameter(data, requires_grad=param.requires_grad))
    yield


def materialise(model: torch.nn.Module, device: torch.device | str, dtype: torch.dtype | None = None):
    """Give a model built under :func:`meta_modules` its weights, one module at a time, on ``device``
    in ``dtype`` (None: as built): ``model.init_weights(around=...)`` allocates each module's
    parameters on the device right before it fills them. Its init draws each module's values on the
    CPU in fp32 and copies them in, so the weights equal an eager build's (cast to ``dtype``) under the
    same seed, and the host holds about one module's fp32 values at a time beyond the model itself.
    Returns ``model``; raises if a parameter or buffer is left on the meta device."""
    device = torch.device(device)
    model.init_weights(around=lambda module: _allocated(module, device, dtype))
    left = [name for name, t in itertools.chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"init_weights left {len(left)} tensors on the meta device: {left[:5]}")
    return model
