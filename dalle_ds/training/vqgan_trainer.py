"""The VQGAN trainer: taming-transformers' recipe on the shared loop (DeepSpeed, checkpoints, exact
resume, metrics).

Each step: L1 pixel loss, LPIPS (with ``vqgan.perceptual_weights``), the codebook loss, and from
``vqgan.disc_start`` on the patch discriminator's hinge loss and the generator's adversarial term
weighted adaptively (:mod:`dalle_ds.models.vqgan_loss`). Generator and discriminator are one
module under one engine: one AdamW (taming's Adam(0.5, 0.9), no decay) over two parameter sets,
the generator's and the discriminator's, one LR schedule, both updated from the same backward; the
discriminator's state is checkpointed and resumed with the rest. ``<output>/final`` is the VQGAN
alone. ZeRO stages 0-2 (the adaptive weight differentiates by the whole last decoder layer, and the
generator's adversarial term reads the discriminator's whole weights, which ZeRO-3 partitions).
"""

from __future__ import annotations

from ..distributed import collectives as dd
from ..inference.serialization import load_model
from ..inference.taming import load_lpips
from ..models.vqgan import VQGAN
from ..models.vqgan_config import VQGANConfig
from ..models.vqgan_loss import VQGANTrainingModel
from .errors import UsageError
from .tokenizer_trainer import ImageTokenizerTrainer, codebook_usage

__all__ = ["VQGANTrainer"]


class VQGANTrainer(ImageTokenizerTrainer):
    model_kind = "vqgan"

    def build_model(self):
        a = self.cfg.vqgan
        if not isinstance(self.config, VQGANConfig):
            raise UsageError(f"--preset {self.cfg.preset} is not a VQGAN config (model_type vqgan)")
        if self.cfg.train.compile:
            raise UsageError("train.compile (--compile) compiles transformer blocks; the VQGAN has none: remove it")
        if self.zero3:
            raise UsageError(
                f"{self.cfg.deepspeed_config}: ZeRO stage 3 partitions the weights the VQGAN's adaptive GAN "
                "weight and the generator's adversarial term read whole; use stage 0-2"
            )
        model = VQGANTrainingModel(self.config, a.disc_layers, a.disc_ndf)
        if self.config.quantizer == "ema" and self.world > 1:  # codebook statistics summed over ranks
            model.quantize.ema.collectives = dd.TorchCollectives()
        if a.init_from:
            self._init_from(model, a.init_from)
        self.perceptual = load_lpips(a.perceptual_weights) if a.perceptual_weights else None
        self.disc_start = a.disc_start if a.disc_start >= 0 else self.cfg.train.steps // 2
        return model

    def _init_from(self, model: VQGANTrainingModel, folder: str) -> None:
        source = load_model(folder)
        if not isinstance(source, VQGAN) or source.config != self.config:
            got = source.config.to_dict() if isinstance(source, VQGAN) else type(source).__name__
            diff = {k: v for k, v in got.items() if self.config.to_dict().get(k) != v} if isinstance(got, dict) else got
            raise UsageError(f"vqgan.init_from {folder} does not match --preset {self.cfg.preset}: {diff}")
        model.load_state_dict(source.state_dict(), strict=False)  # the discriminator starts fresh
        self.log(f"vqgan.init_from: started from {folder}")

    def on_engine(self) -> None:
        if self.perceptual is not None:
            self.perceptual.to(self.engine.device)  # fp32: a frozen loss network

    def compute_loss(self, batch):
        a = self.cfg.vqgan
        disc_factor = a.disc_factor if self.step >= self.disc_start else 0.0
        loss, metrics = self.engine(
            self.images(batch), disc_factor=disc_factor, disc_weight=a.disc_weight, codebook_weight=a.codebook_weight,
            pixel_weight=a.pixel_weight, perceptual=self.perceptual, perceptual_weight=a.perceptual_weight,
            disc_loss=a.disc_loss,
        )  # fmt: skip
        codes = metrics.pop("codes")
        metrics = {"loss": loss, **metrics, "disc_factor": disc_factor,
                   "codebook_usage": codebook_usage(codes, self.config.codebook_size)}  # fmt: skip
        return loss, metrics, codes.numel()
