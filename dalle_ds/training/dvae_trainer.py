"""The dVAE (image tokenizer) trainer: the paper's recipe on the shared loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.synthetic import SyntheticShapes, holdout_combos
from ..distributed import collectives as dd
from ..inference.serialization import save_model
from ..models.config import DVAEConfig
from ..models.dvae import DiscreteVAE
from .errors import UsageError
from .optim import adamw_and_schedule, cosine
from .trainer import Trainer

__all__ = ["DVAETrainer", "codebook_usage"]


def codebook_usage(codes: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """The share of the codebook that ``codes`` use, as a 0-d tensor on their device (no host read:
    ``unique`` and ``bincount`` would size their output from the data, a sync on a GPU)."""
    used = torch.zeros(codebook_size, dtype=torch.bool, device=codes.device)
    return used.index_fill_(0, codes.flatten(), True).sum() / codebook_size


class DVAETrainer(Trainer):
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

    def schedules(self) -> tuple[float, float]:
        a, steps = self.cfg.dvae, self.cfg.train.steps
        tau_steps = a.temperature_steps or steps
        kl_steps = a.kl_steps or max(1, steps // 30)
        return (
            cosine(self.step, tau_steps, a.temperature_start, a.temperature_end),
            cosine(self.step, kl_steps, 0.0, a.kl_weight),
        )

    def compute_loss(self, batch):
        if "image" not in batch:
            raise UsageError(f"--data {self.cfg.data.source} holds precomputed codes; the dVAE trains on images")
        a = self.cfg.dvae
        recon = a.recon_loss
        if self.config.quantizer == "vq":
            out = self.engine(batch["image"], commitment=a.commitment, recon_loss=recon)
            extra = {"commitment": out.commitment}
        else:
            tau, beta = self.schedules()
            out = self.engine(batch["image"], temperature=tau, kl_weight=beta, recon_loss=recon)
            extra = {"kl": out.kl, "temperature": tau, "kl_weight": beta}
        codes = out.logits.argmax(1)
        metrics = {  # device tensors (read when logged) and host floats
            "loss": out.loss,
            **({"recon_nll": out.recon_nll} if recon == "logit_laplace" else {}),  # (log b untrained)
            "mse": F.mse_loss(out.reconstruction.detach(), batch["image"].float()),
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
