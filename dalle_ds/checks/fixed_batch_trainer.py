"""The DALL-E trainer as the throughput check runs it: :class:`~dalle_ds.training.DalleTrainer` unchanged
(model, paper optimiser, DeepSpeed engine, its loop and metrics) fed one fixed batch of random caption
ids and image codes made on the engine's device, so the timed steps hold no data loading and no dVAE
encoding; nothing is saved or exported at the end. Imported by the throughput worker only (it pulls in
the training stack)."""

from __future__ import annotations

import torch

from dalle_ds.training import DalleTrainer

__all__ = ["FixedBatchTrainer"]


class FixedBatchTrainer(DalleTrainer):
    def on_engine(self) -> None:
        super().on_engine()
        c = self.config
        g = torch.Generator().manual_seed(self.cfg.train.seed)
        text = torch.randint(0, c.text_vocab_size, (self.micro, c.text_len), generator=g)
        codes = torch.randint(0, c.image_vocab_size, (self.micro, c.image_len), generator=g)
        self.check_batch({"text": text, "codes": codes})  # on the host, as the trainer checks every batch
        device = self.engine.device
        self.fixed_batch = {"text": text.to(device), "codes": codes.to(device)}

    def batch(self, micro_step: int) -> dict:
        return self.fixed_batch

    def finish(self) -> None:
        self.log(f"done: {self.step} steps; a throughput run keeps no checkpoint and no export")
