"""Sample order for map-style data sets (the synthetic shapes set) over data-parallel ranks.

The order is a pure function of (seed, global sample position): every rank reads a disjoint,
equally sized slice of a per-epoch permutation, and a resumed run continues at the saved position,
so resuming neither repeats nor skips samples.
"""

from __future__ import annotations

import torch

from ..utils.seeding import derive_seed

__all__ = ["EpochOrder"]

_ORDER = 1  # derive_seed domain of the per-epoch permutations


class EpochOrder:
    def __init__(self, size: int, micro_batch: int, rank: int, world: int, seed: int):
        self.size, self.micro, self.rank, self.world, self.seed = size, micro_batch, rank, world, seed
        self._perm: tuple[int, torch.Tensor | None] = (-1, None)  # (epoch, its permutation), built lazily

    def indices(self, micro_step: int) -> list[int]:
        """Data set indices of this rank's micro batch number ``micro_step`` (counted over the run)."""
        start = (micro_step * self.world + self.rank) * self.micro
        out = []
        for pos in range(start, start + self.micro):
            epoch, offset = divmod(pos, self.size)
            if self._perm[0] != epoch:
                g = torch.Generator().manual_seed(derive_seed(self.seed, _ORDER, epoch))
                self._perm = (epoch, torch.randperm(self.size, generator=g))
            out.append(int(self._perm[1][offset]))
        return out
