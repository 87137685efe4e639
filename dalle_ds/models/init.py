"""Building modules without initialising their weights: on the meta device (sizes only) or when
loaded weights replace them next.

torch's weight initialisers on meta tensors run Python reference kernels whose first call imports
``torch._dynamo`` (about 2-3 s per process on a small CPU), although a meta tensor holds no values
to initialise. :func:`no_weight_init` turns the initialisers into no-ops while modules are built.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["meta_modules", "no_weight_init"]

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
