"""FID and CLIP score of generated images against a stream's real image-text pairs (the paper's
MS-COCO protocol: N captions -> one sample each, optionally the CLIP-best of ``candidates`` -> FID
against the N real images), through torchmetrics.

- FID: ``torchmetrics.image.fid.FrechetInceptionDistance``. By default its ``feature=2048`` Inception
  is torch-fidelity's port of the TF-FID network (numbers comparable with papers); torch-fidelity
  downloads its weights on first use into torch's hub cache. ``feature_extractor`` swaps in any
  ``nn.Module`` mapping float images (B, 3, H, W) in [0, 1] to (B, D) features (the tests inject a
  small one; the real Inception is never run in the tests: this machine has no matching torchvision).
  Statistics accumulate per batch (sums and Gram matrices), so images never all sit in memory.
- CLIP score: ``torchmetrics.multimodal.clip_score.CLIPScore`` on a ``transformers`` CLIP model (a local
  folder or a hub id): max(100 * mean cosine(image, caption), 0).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from pathlib import Path

import torch

from ..utils.images import as_float_image
from ..utils.seeding import derive_seed

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "MetricUnavailableError",
    "clip_score_metric",
    "fid_metric",
    "generate_and_score",
    "load_feature_extractor",
]

DEFAULT_CLIP_MODEL = "openai/clip-vit-base-patch32"
# torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3 (read from the package when installed).
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
EVAL_EXTRA = (
    "pip install 'dalle-ds[eval]' (torch-fidelity and torchvision; torchvision must be the build that "
    "matches the installed torch, e.g. from the same index URL)"
)


class MetricUnavailableError(RuntimeError):
    """A metric cannot be built here: a package is missing or the model weights cannot be loaded."""


def _library_fid(**kwargs):
    """torchmetrics' FID (the one place it is built, so tests can stand in for the library)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(**kwargs)


def _inception_url() -> str:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        return URL_INCEPTION_V3
    except Exception:  # noqa: BLE001 - only the URL for the message; the fallback is the same constant
        return INCEPTION_URL


def fid_metric(feature_extractor: torch.nn.Module | None = None, weights_path=None, device="cpu"):
    """A ``FrechetInceptionDistance`` that takes float images in [0, 1] (``normalize=True``).

    ``feature_extractor=None``: the standard FID Inception (2048-d pool features), its weights from
    ``weights_path`` (a local ``.pth``, for offline machines) or downloaded by torch-fidelity. Raises
    :class:`MetricUnavailableError` when torch-fidelity is missing or the weights cannot be fetched.
    """
    if feature_extractor is not None:
        if weights_path is not None:
            raise ValueError("weights_path is for the standard Inception, not a custom feature extractor")
        return _library_fid(feature=feature_extractor.eval(), normalize=True).to(device)
    try:
        import torch_fidelity  # noqa: F401
    except (ImportError, RuntimeError) as e:  # RuntimeError: a torchvision built for another torch
        raise MetricUnavailableError(
            f"FID with the standard Inception needs torch-fidelity: {EVAL_EXTRA}. ({type(e).__name__}: {e})"
        ) from e
    if weights_path is not None and not Path(weights_path).is_file():
        raise MetricUnavailableError(f"--fid-weights {weights_path}: no such file")
    try:
        metric = _library_fid(feature=2048, normalize=True, feature_extractor_weights_path=weights_path)
    except (OSError, ConnectionError) as e:  # urllib's URLError / HTTPError are OSErrors
        url = _inception_url()
        cache = Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]
        raise MetricUnavailableError(
            f"could not fetch the standard FID Inception weights ({type(e).__name__}: {e}). torch-fidelity "
            f"downloads them from {url} into torch's hub cache ({cache}); on a machine without internet, "
            "copy that file there, or download it elsewhere and pass --fid-weights PATH "
            "(feature_extractor_weights_path)."
        ) from e
    return metric.to(device)


def load_feature_extractor(spec: str) -> torch.nn.Module:
    """``"module:callable"`` -> the ``nn.Module`` the callable returns (e.g. ``my_feats:make``)."""
    module, sep, name = spec.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"{spec!r}: expected 'module:callable'")
    factory = getattr(importlib.import_module(module), name)
    extractor = factory()
    if not isinstance(extractor, torch.nn.Module):
        raise TypeError(f"{spec} returned a {type(extractor).__name__}, not a torch.nn.Module")
    return extractor


def _features(out) -> torch.Tensor:
    # transformers >= 5 returns the projected embedding as pooler_output of a model output;
    # torchmetrics 1.9 expects a tensor (Lightning-AI/torchmetrics#3407, fixed after 1.9.0).
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class _CLIPFeatures(torch.nn.Module):
    """A ``transformers.CLIPModel`` whose ``get_*_features`` return tensors on every transformers."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.config = clip.config

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return _features(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return _features(self.clip.get_text_features(*args, **kwargs))


def _load_clip(name_or_path: str):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(name_or_path).eval()
        image_processor = CLIPImageProcessor.from_pretrained(name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise MetricUnavailableError(
            f"could not load the CLIP model {name_or_path!r} (a local folder or a hub id; offline, download "
            f"it first, e.g. `hf download {DEFAULT_CLIP_MODEL}`): {e}"
        ) from e
    return _CLIPFeatures(model), CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def clip_score_metric(model_name_or_path: str = DEFAULT_CLIP_MODEL, device="cpu"):
    """torchmetrics' ``CLIPScore`` with a transformers CLIP model (any folder or hub id; torchmetrics'
    own loader accepts only a few hub names). Update it with uint8 images (as :func:`generate_and_score`
    does) or lists of them; raises :class:`MetricUnavailableError` when the model cannot be loaded."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    return CLIPScore(model_name_or_path=lambda: _load_clip(model_name_or_path)).to(device)


def _share_clip(clip):
    """A second CLIPScore accumulator on the same model (no second copy of the weights)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    return CLIPScore(model_name_or_path=lambda: (clip.model, clip.processor)).to(clip.device)


def _uint8(images: torch.Tensor) -> torch.Tensor:
    """Float [0, 1] -> uint8 [0, 255], rounded like ``utils.images.to_pil`` (what CLIP processors take)."""
    return (images.float().clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def generate_and_score(
    model,
    tokenizer,
    batches: Iterable[dict],
    num: int,
    fid=None,
    clip=None,
    candidates: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    **sampling,
) -> dict:
    """Generate one image per caption of ``batches`` (the first ``num`` pairs of any stream:
    ``{"caption": [...], "image": (B, 3, H, W) uint8 or float in [0, 1]}``) and score them against the
    real images: ``fid`` (from :func:`fid_metric`) gets the real images as ``real=True`` and the samples
    as ``real=False``; ``clip`` (from :func:`clip_score_metric`) scores samples against their captions,
    and the real images against theirs (``real_clip_score``, a reference). ``candidates`` > 1: sample that
    many per caption and keep the one CLIP ranks best (the paper's reranking; needs ``clip``).

    Caption i's samples are seeded by ``derive_seed(seed, i)``. ``sampling`` goes to
    :func:`~dalle_ds.inference.generation.sample_images` (top_k, top_p, temperature). The metrics are
    updated, not reset: pass fresh ones. Returns the numbers as a dict."""
    from . import generation

    if candidates < 1:
        raise ValueError(f"candidates={candidates}: must be >= 1")
    if candidates > 1 and clip is None:
        raise ValueError("candidates > 1 keeps the CLIP-best sample: give a CLIP model")
    real_clip = _share_clip(clip) if clip is not None else None
    if clip is not None:
        clip_model, processor = clip.model.clip, clip.processor
    done = 0
    for batch in batches:
        captions = list(batch["caption"])[: num - done]
        if not captions:
            break
        real = as_float_image(batch["image"][: len(captions)])
        samples = []
        for j, caption in enumerate(captions):
            seed_i = derive_seed(seed, done + j)
            images, _ = generation.sample_images(
                model, tokenizer, caption, candidates, batch_size=batch_size, seed=seed_i, **sampling
            )
            if candidates > 1:
                images, _, _ = generation.rerank(
                    images, caption, 1, clip_model, processor.image_processor, processor.tokenizer
                )
            samples.append(images[:1].cpu())
        samples = torch.cat(samples)
        if fid is not None:
            fid.update(real.to(fid.device), real=True)
            fid.update(samples.to(fid.device), real=False)
        if clip is not None:
            real_clip.update(_uint8(real).to(clip.device), captions)
            clip.update(_uint8(samples).to(clip.device), captions)
        done += len(captions)
        if done >= num:
            break
    result = {"samples": done, "candidates": candidates, "reranked": candidates > 1}
    if fid is not None:
        result["fid"] = float(fid.compute())
    if clip is not None:
        result["clip_score"] = float(clip.compute())
        result["real_clip_score"] = float(real_clip.compute())
    return result
