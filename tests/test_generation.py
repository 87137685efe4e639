"""Sampling from a pipeline folder, CLIP reranking plumbing (tiny random CLIP, no download), generate.py."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, save_clip
from PIL import Image

from dalle_ds import DALLE, DiscreteVAE, get_preset
from dalle_ds.data.synthetic import ALL_COMBOS, caption_of
from dalle_ds.data.text import train_tokenizer
from dalle_ds.inference.generation import clip_scores, load_pipeline, rerank, sample_images, save_pipeline


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    torch.manual_seed(0)
    config = get_preset("dalle-tiny")
    tok_file = root / "tok.json"
    train_tokenizer([caption_of(c) for c in ALL_COMBOS], 64, tok_file)
    return save_pipeline(root / "final", DALLE(config), tok_file, DiscreteVAE(get_preset("dvae-tiny")))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, pipeline_dir):
    """A tiny randomly initialised CLIP, saved like a hub model (weights, image processor, tokenizer)."""
    return save_clip(tmp_path_factory.mktemp("clip"), pipeline_dir / "tokenizer.json")


def test_pipeline_round_trip_and_seeded_sampling(pipeline_dir):
    model, tokenizer = load_pipeline(pipeline_dir)
    assert isinstance(model.dvae, DiscreteVAE)
    images, codes = sample_images(model, tokenizer, "a red circle at the top left", 5, batch_size=2, seed=3, top_k=8)
    again, codes2 = sample_images(model, tokenizer, "a red circle at the top left", 5, batch_size=2, seed=3, top_k=8)
    assert images.shape == (5, 3, 32, 32) and torch.equal(codes, codes2) and torch.equal(images, again)
    with torch.no_grad():
        torch.testing.assert_close(images, model.dvae.decode(codes.reshape(5, 8, 8)).float().clamp(0, 1))
    with pytest.raises(ValueError, match="not a DALL-E transformer"):
        load_pipeline(pipeline_dir / "dvae")  # a dVAE folder is not a pipeline


def test_rerank_keeps_the_k_best_clip_scores_in_order(clip_dir):
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    clip = CLIPModel.from_pretrained(clip_dir).eval()
    processor, tokenizer = CLIPImageProcessor.from_pretrained(clip_dir), AutoTokenizer.from_pretrained(clip_dir)
    torch.manual_seed(1)
    images = torch.rand(6, 3, 32, 32)
    caption = "a blue square in the center"
    top, order, scores = rerank(images, caption, 3, clip, processor, tokenizer)
    # Scores are CLIP's own image-text logits for each candidate, computed one image at a time here.
    for i in range(6):
        alone = clip_scores(images[i : i + 1], caption, clip, processor, tokenizer)
        torch.testing.assert_close(alone[0], scores[i], atol=1e-4, rtol=1e-4)
    assert order.tolist() == sorted(range(6), key=lambda i: -scores[i].item())[:3]
    assert torch.equal(top, images[order])


def test_generate_script_reranks_and_writes_a_grid(pipeline_dir, clip_dir, tmp_path):
    out = tmp_path / "grid.png"
    cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), "a green triangle at the bottom right"]
    cmd += ["--checkpoint", str(pipeline_dir), "--num-candidates", "6", "--top-k-images", "2", "--clip", str(clip_dir)]
    cmd += ["--out", str(out), "--batch-size", "3", "--top-p", "0.9", "--seed", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.with_name("grid.png.json").read_text())
    scores = torch.tensor(record["clip_scores"])
    assert len(scores) == 6 and record["kept"] == scores.argsort(descending=True)[:2].tolist()
    assert Image.open(out).size == (2 * (32 + 2) + 2, 32 + 4)  # two 32 px images, 2 px padding
    # Priming with the top rows of an image keeps those rows' codes in every sample.
    Image.new("RGB", (32, 32), (220, 40, 40)).save(tmp_path / "red.png")
    cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), "a red square at the top"]
    cmd += ["--checkpoint", str(pipeline_dir), "--num-candidates", "2", "--top-k-images", "2"]
    cmd += ["--out", str(tmp_path / "primed.png"), "--prime-image", str(tmp_path / "red.png"), "--prime-rows", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
