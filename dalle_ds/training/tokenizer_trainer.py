"""What the image-tokenizer trainers (dVAE, VQGAN) share on the loop: images only, the synthetic set at
the tokenizer's size, AdamW with the run's schedule, no transformer blocks, reconstruction grids,
codebook use."""

from __future__ import annotations

import torch

from ..data.synthetic import SyntheticShapes, holdout_combos
from .errors import UsageError
from .optim import adamw_and_schedule
from .trainer import Trainer

__all__ = ["ImageTokenizerTrainer", "codebook_usage"]


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """The share of the codebook that ``codes`` use, as a 0-d tensor on their device (no host read:
    ``unique`` and ``bincount`` would size their output from the data, a sync on a GPU)."""
    used = torch.zeros(codebook_size, dtype=torch.bool, device=codes.device)
    return used.index_fill_(0, codes.flatten(), True).sum() / codebook_size


class ImageTokenizerTrainer(Trainer):
    """A trainer of a model with ``encode``/``decode`` and ``config.image_size`` on images."""

    def model_blocks(self):
        return torch.nn.ModuleList()

    def build_optimizer(self, model):
        return adamw_and_schedule(model.parameters(), self.cfg, self.ds_config)

    def build_dataset(self):
        # --holdout keeps the same combinations out of the tokenizer as the transformer trainer does.
        data = self.cfg.data
        held = holdout_combos(data.holdout)
        return SyntheticShapes(data.synthetic_size, self.config.image_size, seed=self.cfg.train.seed, exclude=held)

    def image_size(self) -> int:
        return self.config.image_size

    def images(self, batch: dict) -> torch.Tensor:
        if "image" not in batch:
            raise UsageError(
                f"--data {self.cfg.data.source} holds precomputed codes; the {self.config.title} trains on images"
            )
        return batch["image"]

    def write_images(self, step: int) -> None:
        from ..utils.images import save_grid

        if self.preview is None or (self.rank != 0 and not self.zero3):
            return
        x = self.preview["image"][:8]
        module = self.engine.module
        with torch.no_grad():  # under ZeRO-3 every rank runs this: the forward gathers parameters
            recon = module.decode(module.encode(x))
        if self.rank == 0:
            save_grid(torch.cat([x, recon.float()]), self.out / "images" / f"recon_{step:08d}.png", nrow=len(x))
