"""Text-to-image sampling from a saved pipeline, and CLIP reranking as in the paper (N -> top k).

A pipeline folder (what the DALL-E trainer exports as ``<output>/final``) holds the transformer
(``config.json`` + ``model.safetensors``), ``tokenizer.json`` and the dVAE it was trained with in
``dvae/``. Loading builds the models on the meta device and assigns the stored tensors, so a large
model is never materialised twice.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ..models.dalle import DALLE
from .serialization import load_dvae, load_model, save_model

__all__ = ["add_pipeline_parts", "clip_scores", "load_pipeline", "rerank", "sample_images", "save_pipeline"]

TOKENIZER_FILE = "tokenizer.json"
DVAE_DIR = "dvae"


def save_pipeline(directory, model: DALLE, tokenizer_file, dvae) -> Path:
    """Write the transformer, its tokenizer and its dVAE into one folder."""
    save_model(model, directory)
    return add_pipeline_parts(directory, tokenizer_file, dvae)


def add_pipeline_parts(directory, tokenizer_file, dvae) -> Path:
    """Add the tokenizer and the dVAE to a folder that holds the transformer (e.g. an export)."""
    directory = Path(directory)
    shutil.copyfile(tokenizer_file, directory / TOKENIZER_FILE)
    save_model(dvae, directory / DVAE_DIR)
    return directory


def load_pipeline(directory, map_location="cpu"):
    """(DALLE with its dVAE attached, tokenizers.Tokenizer) from a pipeline folder."""
    directory = Path(directory)
    model = load_model(directory, map_location)
    if not isinstance(model, DALLE):
        raise ValueError(f"{directory}: holds a {type(model).__name__}, not a DALL-E transformer")
    return attach_pipeline_parts(directory, model, map_location)


def attach_pipeline_parts(directory, model: DALLE, map_location):
    """(model with the folder's dVAE attached on ``map_location``, the folder's tokenizer)."""
    from ..data.text import load_tokenizer

    directory = Path(directory)
    for needed in (directory / TOKENIZER_FILE, directory / DVAE_DIR):
        if not needed.exists():
            raise FileNotFoundError(f"{needed} is missing: a pipeline folder needs {TOKENIZER_FILE} and {DVAE_DIR}/")
    model.set_dvae(load_dvae(directory / DVAE_DIR, map_location))
    return model, load_tokenizer(directory / TOKENIZER_FILE)


@torch.no_grad()
def sample_images(
    model: DALLE,
    tokenizer,
    caption: str,
    num: int,
    batch_size: int = 16,
    seed: int = 0,
    prime: torch.Tensor | None = None,
    **sampling,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` samples for one caption: (images float (num, 3, H, W) in [0, 1], codes (num, N)).

    ``prime``: (L,) codes of the top rows of an image, shared by every sample. ``sampling`` goes to
    :meth:`DALLE.generate` (top_k, top_p, temperature, cache). Seeded: the same call gives the same
    images. The caption is encoded once; each batch of ``batch_size`` candidates shares one prefill
    of the text (and primed codes) and draws on the model's device from a generator there.
    """
    from ..data.text import encode_captions

    if model.dvae is None:
        raise ValueError("sample_images needs the model's dVAE (load_pipeline attaches it)")
    device = model.text_emb.weight.device  # the main device, also when accelerate spreads the blocks
    text = encode_captions(tokenizer, [caption], model.config).to(device)  # (1, text_len)
    primed = None if prime is None else prime.reshape(1, -1).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    codes = []
    for start in range(0, num, batch_size):
        b = min(batch_size, num - start)
        codes.append(model.generate(text, generator=generator, prime=primed, num_samples=b, **sampling))
    codes = torch.cat(codes)
    images = model.dvae.decode(codes.reshape(num, model.config.image_grid, model.config.image_grid))
    return images.float().clamp(0, 1), codes


@torch.no_grad()
def clip_scores(images: torch.Tensor, caption: str, clip_model, image_processor, tokenizer) -> torch.Tensor:
    """CLIP's image-text logits (num,) of float images (num, 3, H, W) in [0, 1] against ``caption``.

    ``clip_model`` is a ``transformers.CLIPModel``; ``image_processor`` and ``tokenizer`` are the
    model's own (``CLIPProcessor.from_pretrained(path)`` has both)."""
    from ..utils.images import to_pil

    pil = [to_pil(img) for img in images]
    device = next(clip_model.parameters()).device
    pixels = image_processor(images=pil, return_tensors="pt")["pixel_values"].to(device)
    text = tokenizer([caption], padding=True, return_tensors="pt").to(device)
    out = clip_model(input_ids=text["input_ids"], attention_mask=text.get("attention_mask"), pixel_values=pixels)
    return out.logits_per_image[:, 0].float().cpu()


def rerank(images: torch.Tensor, caption: str, k: int, clip_model, image_processor, tokenizer):
    """The paper's reranking: keep the ``k`` candidates CLIP scores highest, best first.
    Returns (images (k, ...), their indices into ``images``, all scores)."""
    scores = clip_scores(images, caption, clip_model, image_processor, tokenizer)
    order = scores.argsort(descending=True)[:k]
    return images[order], order, scores
