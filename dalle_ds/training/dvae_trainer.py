"""The dVAE (image tokenizer) trainer: the paper's recipe on the shared loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..distributed import collectives as dd
from ..inference.serialization import save_model
from ..models.config import DVAEConfig
from ..models.dvae import DiscreteVAE
from .errors import UsageError
from .optim import cosine
from .tokenizer_trainer import ImageTokenizerTrainer, codebook_usage

__all__ = ["DVAETrainer", "codebook_usage"]


class DVAETrainer(ImageTokenizerTrainer):
    """The paper's dVAE recipe (the defaults of :class:`DVAERunConfig`), schedules scaled to the run:
    tau 1 -> 1/16 and KL weight 0 -> 6.6 (cosine), LR cosine, AdamW(0.9, 0.999, 1e-8, wd 1e-4),
    optional EMA of the weights. A ``quantizer: vq`` config trains with the EMA codebook instead
    (``--commitment``), its statistics summed over ranks so every rank keeps the same codebook."""

    model_kind = "dvae"

    def build_model(self):
        if not isinstance(self.config, DVAEConfig):
            raise UsageError(f"--preset {self.cfg.preset} is not a dVAE config")
        if self.cfg.train.compile:
            raise UsageError("train.compile (--compile) compiles transformer blocks; the dVAE has none: remove it")
        if self.cfg.dvae.ema and self.zero3:
            raise UsageError("--ema needs whole parameters on every rank: use ZeRO stage 0-2 for the dVAE")
        model = DiscreteVAE(self.config)
        if model.quantizer is not None and self.world > 1:
            model.quantizer.collectives = dd.TorchCollectives()
        self.ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()} if self.cfg.dvae.ema else None
        return model

    def schedules(self) -> tuple[float, float]:
        a, steps = self.cfg.dvae, self.cfg.train.steps
        tau_steps = a.temperature_steps or steps
        kl_steps = a.kl_steps or max(1, steps // 30)
        return (
            cosine(self.step, tau_steps, a.temperature_start, a.temperature_end),
            cosine(self.step, kl_steps, 0.0, a.kl_weight),
        )

    def compute_loss(self, batch):
        images = self.images(batch)
        a = self.cfg.dvae
        recon = a.recon_loss
        if self.config.quantizer == "vq":
            out = self.engine(images, commitment=a.commitment, recon_loss=recon)
            extra = {"commitment": out.commitment}
        else:
            tau, beta = self.schedules()
            out = self.engine(images, temperature=tau, kl_weight=beta, recon_loss=recon)
            extra = {"kl": out.kl, "temperature": tau, "kl_weight": beta}
        codes = out.logits.argmax(1)
        metrics = {  # device tensors (read when logged) and host floats
            "loss": out.loss,
            **({"recon_nll": out.recon_nll} if recon == "logit_laplace" else {}),  # (log b untrained)
            "mse": F.mse_loss(out.reconstruction.detach(), images.float()),
            **extra,
            "codebook_usage": codebook_usage(codes, self.config.codebook_size),
        }
        return out.loss, metrics, codes.numel()

    def after_step(self):
        if self.ema is not None:
            with torch.no_grad():
                for k, v in self.engine.module.state_dict().items():
                    self.ema[k].mul_(self.cfg.dvae.ema_decay).add_(v.float(), alpha=1 - self.cfg.dvae.ema_decay)

    def export(self):
        final = super().export()
        if self.ema is not None and self.rank == 0:
            model = DiscreteVAE(self.config)
            model.load_state_dict(self.ema)
            save_model(model, self.out / "final_ema")
        return final

    def extra_state(self):
        return {"ema": self.ema} if self.ema is not None else {}

    def load_extra_state(self, state):
        if self.ema is not None and "ema" in state:
            self.ema = state["ema"]
