"""Seed derivation: every random stream dalle-ds draws is keyed by the run's seed plus the place it
serves (rank, epoch, worker slot, sample position...), through one function.

``derive_seed(seed, *keys)`` hashes the key tuple with numpy's ``SeedSequence`` (well-mixed, so
nearby keys give unrelated streams, and no two key tuples collide the way ``seed * K + rank``
arithmetic can). Keys are non-negative integers; the result fits ``torch.manual_seed`` and
``random.Random``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["derive_seed", "numpy_rng"]


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that is a pure function of ``(seed, *keys)``."""
    words = np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(2, np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


def numpy_rng(seed: int, *keys: int) -> np.random.Generator:
    """A numpy generator keyed like :func:`derive_seed` (the same key tuple, the same stream)."""
    return np.random.default_rng([int(seed), *map(int, keys)])
