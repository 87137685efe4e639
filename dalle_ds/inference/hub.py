"""Model hub: model cards for pipeline folders, ``from_pretrained`` for local folders and hub repos.

A pipeline folder (``<output>/final`` of the DALL-E trainer) is already what goes to the hub:
``model.safetensors`` (or Hugging Face shards + ``model.safetensors.index.json``) + ``config.json``
(the transformer), ``tokenizer.json``, ``dvae/`` (its
image tokenizer) and a ``README.md`` model card with hub metadata. No pickles: weights are
safetensors, and loading refuses pickled weights unless asked to.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .generation import load_pipeline
from .serialization import INDEX_NAME, WEIGHTS_NAME

__all__ = ["PICKLE_SUFFIXES", "from_pretrained", "has_safetensors", "upload_plan", "write_model_card"]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def write_model_card(directory, settings: dict, sample_grid=None, license: str = "mit") -> Path:
    """``README.md`` with hub metadata (library, pipeline tag, tags), the model's configuration,
    its training settings and, if given, a sample grid copied in as ``samples.png``."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    image_tokenizer = _tokenizer_summary(directory / "dvae" / "config.json")
    if sample_grid is not None:
        shutil.copyfile(sample_grid, directory / "samples.png")
    lines = [
        "---",
        "library_name: dalle-ds",
        "pipeline_tag: text-to-image",
        f"license: {license}",
        "tags:",
        "- text-to-image",
        "- dall-e",
        "- deepspeed",
        "---",
        "",
        f"# {settings.get('name', directory.name)}",
        "",
        "A DALL-E-style text-to-image transformer trained with "
        "[dalle-ds](https://github.com/dalle-ds/dalle-ds): a decoder-only sparse transformer over "
        f"[text tokens, {image_tokenizer['name']} image codes], with its {image_tokenizer['name']} image "
        "tokenizer in `dvae/` and its BPE tokenizer in `tokenizer.json`.",
        "",
        "```python",
        "from dalle_ds.inference.hub import from_pretrained",
        "from dalle_ds.inference.generation import sample_images",
        "",
        f'model, tokenizer = from_pretrained("{settings.get("repo_id", "path/or/repo-id")}")',
        'images, codes = sample_images(model, tokenizer, "a red circle at the top left", num=8, top_k=32)',
        "```",
        "",
    ]
    if (directory / "samples.png").exists():
        lines += ["## Samples", "", "![samples](samples.png)", ""]
    lines += ["## Model", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in config.items()]
    lines += ["", "## Image tokenizer", "", "| key | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in image_tokenizer.items()]
    lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in settings.items() if k not in ("name", "repo_id")]
    path = directory / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _tokenizer_summary(config_path: Path) -> dict:
    """The image tokenizer's kind, grid and codebook for the card (from ``dvae/config.json``)."""
    if not config_path.is_file():
        return {"name": "image"}
    from ..models.config import TOKENIZER_KINDS, config_from_dict

    data = json.loads(config_path.read_text())
    kind = data.get("model_type")
    if kind not in TOKENIZER_KINDS:
        return {"name": "image", "model_type": kind}
    c = config_from_dict(data, str(config_path), TOKENIZER_KINDS)
    return {"name": c.title, "model_type": kind, "image_size": c.image_size,
            "grid": f"{c.grid_size}x{c.grid_size}", "codebook_size": c.codebook_size}  # fmt: skip


def from_pretrained(path_or_repo_id: str, revision: str | None = None, map_location="cpu", allow_pickle=False):
    """(DALLE with its image tokenizer (dVAE or VQGAN), text tokenizer) from a local pipeline folder or
    a hub repo id.

    Hub repos are fetched with ``huggingface_hub.snapshot_download`` (cached; ``HF_HUB_OFFLINE=1``
    uses the cache only). Pickled weights (``*.bin``, ``*.pt``, ...) without a safetensors file are
    refused unless ``allow_pickle=True``, and then read with ``torch.load(weights_only=True)``.
    """
    local = Path(path_or_repo_id)
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(path_or_repo_id, revision=revision))
    for folder in (local, local / "dvae"):
        if has_safetensors(folder):
            continue
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if not pickles:
            continue  # load_pipeline names what is missing
        if not allow_pickle:
            raise ValueError(
                f"{folder} has pickled weights {pickles} and no model.safetensors: pickles can run code "
                f"when loaded. Pass allow_pickle=True only if you trust the source."
            )
        _convert_pickle(folder, folder / pickles[0])
    return load_pipeline(local, map_location)


def has_safetensors(folder) -> bool:
    """Whether ``folder`` holds safetensors weights: ``model.safetensors`` or a sharded index."""
    return (Path(folder) / WEIGHTS_NAME).is_file() or (Path(folder) / INDEX_NAME).is_file()


def _convert_pickle(folder: Path, weights: Path) -> None:
    """Write model.safetensors from a pickled state dict (tensor data only: weights_only=True)."""
    import torch
    from safetensors.torch import save_file

    state = torch.load(weights, map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors", metadata={"format": "pt"})


def upload_plan(directory) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file a push of ``directory`` uploads, sorted."""
    directory = Path(directory)
    files = [p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return sorted((str(p.relative_to(directory)), p.stat().st_size) for p in files)
