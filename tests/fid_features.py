"""A small fixed feature extractor for FID tests (importable as ``fid_features:make`` by evaluate.py's
``--fid-feature-extractor`` when tests/ is on PYTHONPATH). Not the Inception: numbers are test-only."""

import torch
import torch.nn.functional as F

POOL = 4
NUM_FEATURES = 8


class PooledLinear(torch.nn.Module):
    """Average-pool to 4x4, then a frozen random linear map to 8 features with no bias, so adding a
    constant c to every pixel shifts every feature vector by the same ``shift_of(c)``."""

    num_features = NUM_FEATURES

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(NUM_FEATURES, 3 * POOL * POOL, generator=g))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(images.float(), POOL).flatten(1) @ self.weight.T

    def shift_of(self, c: float) -> torch.Tensor:
        """The feature shift of adding ``c`` to every pixel."""
        return c * self.weight.sum(1)


def make() -> PooledLinear:
    return PooledLinear()
