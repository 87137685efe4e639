"""What trains a VQGAN (taming-transformers' ``VQLPIPSWithDiscriminator`` recipe): an L1 pixel loss,
an optional LPIPS perceptual loss, the codebook loss, and a patch discriminator with a hinge loss
whose generator term is weighted adaptively by the last decoder layer's gradient norms.

:class:`VQGANTrainingModel` is a :class:`~dalle_ds.models.vqgan.VQGAN` with the discriminator at
``loss.discriminator`` (taming's key names, so a taming checkpoint's discriminator loads for
fine-tuning); its ``forward`` returns the whole step's loss. Generator and discriminator update
together from one backward: the generator's adversarial term reaches the discriminator's weights
detached (it trains the generator only), the discriminator's loss sees the reconstructions detached.
Exporting keeps the VQGAN alone (``loss.*`` are training-only).

LPIPS (:class:`LPIPS`) is VGG16's first 30 feature layers (torchvision's indices, in five slices)
and five 1x1 ``lin`` layers; its weights never download: give a file
(:func:`dalle_ds.inference.taming.load_lpips`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .vqgan import VQGAN

__all__ = ["LPIPS", "PatchDiscriminator", "VQGANTrainingModel", "adaptive_weight", "hinge_d_loss"]


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator (pix2pix; taming's ``NLayerDiscriminator``): 4x4 convs, stride 2 for the
    first ``n_layers``, LeakyReLU(0.2), BatchNorm from the second conv on; one logit per patch. The
    BatchNorms use batch statistics only (no running averages: they would differ between ranks and
    the discriminator is never run in eval mode)."""

    def __init__(self, channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(ndf * mult, track_running_stats=False),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        for m in self.modules():  # taming's weights_init
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """||d nll / d last|| / (||d g_loss / d last|| + 1e-4), clamped to [0, 1e4], no gradient: the
    generator's adversarial term scaled to the reconstruction term's pull on the last decoder layer."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.float().norm() / (g_grad.float().norm() + 1e-4)).clamp(0.0, 1e4).detach()


class _ScalingLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])


class _Lin(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, 1, bias=False))


_VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
_VGG_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class _VGG16Features(nn.Module):
    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        n_in = 3
        for v in _VGG_CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(n_in, v, 3, padding=1), nn.ReLU(inplace=False)]
                n_in = v
        for i, (a, b) in enumerate(_VGG_SLICES, 1):
            s = nn.Sequential()
            for j in range(a, b):
                s.add_module(str(j), layers[j])
            setattr(self, f"slice{i}", s)

    def forward(self, x):
        outs = []
        for i in range(1, 6):
            x = getattr(self, f"slice{i}")(x)
            outs.append(x)
        return outs


class LPIPS(nn.Module):
    """The learned perceptual distance of Zhang et al. 2018 (VGG16 variant, taming's layout: keys
    ``scaling_layer.*``, ``net.slice{1..5}.*``, ``lin{0..4}.model.1.weight``), frozen. Inputs in
    [-1, 1]; returns (B, 1, 1, 1)."""

    CHANNELS = (64, 128, 256, 512, 512)

    def __init__(self):
        super().__init__()
        self.scaling_layer = _ScalingLayer()
        self.net = _VGG16Features()
        for i, c in enumerate(self.CHANNELS):
            setattr(self, f"lin{i}", _Lin(c))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: its dropout stays off

    def forward(self, a, b):
        s = self.scaling_layer
        fa, fb = self.net((a - s.shift) / s.scale), self.net((b - s.shift) / s.scale)
        total = 0.0
        for i, (x, y) in enumerate(zip(fa, fb, strict=True)):
            x = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            y = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total = total + getattr(self, f"lin{i}").model((x - y) ** 2).mean([2, 3], keepdim=True)
        return total


class VQGANTrainingModel(VQGAN):
    """A VQGAN with its discriminator (``loss.discriminator``) whose forward is a training step's loss."""

    def __init__(self, config, disc_layers: int = 3, disc_ndf: int = 64):
        super().__init__(config)
        self.loss = nn.Module()
        self.loss.discriminator = PatchDiscriminator(config.channels, disc_ndf, disc_layers)

    def forward(
        self,
        images: torch.Tensor,
        disc_factor: float = 0.0,
        disc_weight: float = 1.0,
        codebook_weight: float = 1.0,
        pixel_weight: float = 1.0,
        perceptual: LPIPS | None = None,
        perceptual_weight: float = 1.0,
        disc_loss: str = "hinge",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics) of one step on images in [0, 1]. ``disc_factor`` 0 (before the
        discriminator starts) keeps the adversarial terms at zero; the discriminator still runs, so
        every parameter gets a gradient."""
        recon, codebook_loss, codes = super().forward(images)
        x = 2 * images.float() - 1
        rec = (x - recon.float()).abs().mean()
        nll = pixel_weight * rec
        p_loss = torch.zeros((), device=x.device)
        if perceptual is not None:
            p_loss = perceptual(x, recon.float()).mean()
            nll = nll + perceptual_weight * p_loss
        disc = self.loss.discriminator
        d_weight = g_loss = torch.zeros((), device=x.device)
        if disc_factor > 0:
            # The generator's term through the discriminator's weights detached: it trains the generator only.
            frozen = {n: p.detach() for n, p in disc.named_parameters()}
            g_loss = -functional_call(disc, frozen, (recon,)).float().mean()
            if torch.is_grad_enabled():
                d_weight = adaptive_weight(nll, g_loss, self.decoder.last_layer) * disc_weight
        logits_real = disc(x.to(self.dtype)).float()
        logits_fake = disc(recon.detach()).float()
        d_loss = disc_factor * D_LOSSES[disc_loss](logits_real, logits_fake)
        loss = nll + d_weight * disc_factor * g_loss + codebook_weight * codebook_loss + d_loss
        metrics = {
            "rec_loss": rec.detach(),
            "p_loss": p_loss.detach(),
            "codebook_loss": codebook_loss.detach(),
            "g_loss": g_loss.detach(),
            "d_weight": d_weight,
            "d_loss": d_loss.detach(),
            "logits_real": logits_real.detach().mean(),
            "logits_fake": logits_fake.detach().mean(),
            "mse": F.mse_loss(((recon.detach().float() + 1) / 2).clamp(0, 1), images.float()),
            "codes": codes,
        }
        return loss, metrics
