"""Evaluation: image tokenizer (dVAE, VQGAN) reconstruction, codebook use and rFID, transformer
validation loss (text / image), caption accuracy of generated images on the synthetic set, CLIP score."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..data.synthetic import Combo, caption_of, read_attributes
from ..utils.seeding import derive_seed

__all__ = ["attribute_accuracy", "caption_accuracy", "dvae_metrics", "validation_loss"]


@torch.no_grad()
def dvae_metrics(dvae, batches: Iterable[torch.Tensor], fid=None) -> dict[str, float]:
    """An image tokenizer's (dVAE or VQGAN) reconstruction MSE / PSNR (images in [0, 1]) and codebook
    use over all batches: ``perplexity`` = exp(entropy of the code histogram), ``usage`` = share of
    codes used at least once, ``dead_codes`` = codes never used. With ``fid`` (a FID metric,
    :func:`dalle_ds.inference.metrics.fid_metric`): ``rfid``, the FID of the reconstructions against
    the images (the metric is reset first)."""
    device = next(dvae.parameters()).device
    counts = torch.zeros(dvae.config.codebook_size, dtype=torch.float64, device=device)
    se, pixels = torch.zeros((), dtype=torch.float64, device=device), 0
    if fid is not None:
        fid.reset()
    for images in batches:
        images = images.to(device)
        codes = dvae.encode(images)
        recon = dvae.decode(codes).float().clamp(0, 1)
        se += ((recon - images.float()) ** 2).sum().double()  # summed on the device: one read at the end
        pixels += images.numel()
        counts += torch.bincount(codes.reshape(-1), minlength=counts.numel()).double()
        if fid is not None:
            fid.update(images.float().to(fid.device), real=True)
            fid.update(recon.to(fid.device), real=False)
    counts, se = counts.cpu(), float(se)
    mse = se / max(pixels, 1)
    p = counts / counts.sum()
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    result = {} if fid is None else {"rfid": float(fid.compute())}
    if fid is not None:
        fid.reset()
    return {
        **result,
        "mse": mse,
        "psnr": 10 * math.log10(1 / mse) if mse > 0 else float("inf"),
        "perplexity": math.exp(entropy),
        "usage": float((counts > 0).double().mean()),
        "dead_codes": int((counts == 0).sum()),
    }


@torch.no_grad()
def validation_loss(model, tokenizer, batches: Iterable[dict]) -> dict[str, float]:
    """Mean loss, text loss and image loss (no BPE dropout) over batches of
    ``{"caption": [...], "image": (B, 3, H, W)}`` or ``{"caption", "codes"}``."""
    from ..data.text import encode_captions

    totals, n = {"loss": 0.0, "text_loss": 0.0, "image_loss": 0.0}, 0
    was = model.training
    model.eval()
    device = model.text_emb.weight.device  # the main device, also when accelerate spreads the blocks
    for batch in batches:
        text = encode_captions(tokenizer, batch["caption"], model.config).to(device)
        if "codes" in batch:
            out = model(text, image_codes=batch["codes"].to(device))
        else:
            out = model(text, images=batch["image"].to(device))
        b = len(batch["caption"])
        for key in totals:
            totals[key] += float(getattr(out, key)) * b
        n += b
    model.train(was)
    return {k: v / max(n, 1) for k, v in totals.items()}


def attribute_accuracy(images: torch.Tensor, combos: list[Combo]) -> dict[str, float]:
    """Share of images whose colour / shape / position (read back by the synthetic set's checker)
    match their combo, and the share with all three right."""
    hits = {"colour": 0, "shape": 0, "position": 0, "all": 0}
    for image, combo in zip(images, combos, strict=True):
        got = read_attributes(image)
        if got is None:
            continue
        right = {k: getattr(got, k) == getattr(combo, k) for k in ("colour", "shape", "position")}
        for k, ok in right.items():
            hits[k] += ok
        hits["all"] += all(right.values())
    return {k: v / max(len(combos), 1) for k, v in hits.items()}


def caption_accuracy(model, tokenizer, combos: list[Combo], per_caption: int = 4, seed: int = 0, **sampling):
    """Generate ``per_caption`` images for each combo's caption and score them with
    :func:`attribute_accuracy`; returns (scores, images, combos in image order)."""
    from .generation import sample_images

    images, order = [], []
    for i, combo in enumerate(combos):
        imgs, _ = sample_images(model, tokenizer, caption_of(combo), per_caption, seed=derive_seed(seed, i), **sampling)
        images.append(imgs.cpu())
        order += [combo] * per_caption
    images = torch.cat(images)
    return attribute_accuracy(images, order), images, order
