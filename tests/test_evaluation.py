"""Evaluation metrics against direct computations, the attribute checker on ground truth, evaluate.py."""

import json
import math
import subprocess
import sys

import torch
from conftest import ROOT

from dalle_ds import DALLE, DiscreteVAE, get_preset
from dalle_ds.data.synthetic import ALL_COMBOS, SyntheticShapes, caption_of
from dalle_ds.data.text import encode_captions, train_tokenizer
from dalle_ds.inference.evaluation import attribute_accuracy, caption_accuracy, dvae_metrics, validation_loss
from dalle_ds.inference.generation import save_pipeline


def test_dvae_metrics_match_a_direct_computation():
    torch.manual_seed(0)
    dvae = DiscreteVAE(get_preset("dvae-tiny")).eval()
    images = torch.stack([SyntheticShapes(12, 32, seed=1)[i]["image"] for i in range(12)])
    got = dvae_metrics(dvae, [images[:5], images[5:]])
    with torch.no_grad():
        codes = dvae.encode(images)
        mse = float(((dvae.decode(codes).float().clamp(0, 1) - images) ** 2).mean())
    p = torch.bincount(codes.reshape(-1), minlength=128).double() / codes.numel()
    perplexity = math.exp(-float((p[p > 0] * p[p > 0].log()).sum()))
    assert math.isclose(got["mse"], mse, rel_tol=1e-5)
    assert math.isclose(got["psnr"], 10 * math.log10(1 / mse), rel_tol=1e-5)
    assert math.isclose(got["perplexity"], perplexity, rel_tol=1e-9)
    assert got["dead_codes"] == int((p == 0).sum()) and math.isclose(got["usage"], float((p > 0).double().mean()))


def test_attribute_accuracy_on_ground_truth_and_on_wrong_labels():
    data = SyntheticShapes(60, 32, seed=3)
    items = [data[i] for i in range(60)]
    images = torch.stack([it["image"] for it in items])
    truth = attribute_accuracy(images, [it["combo"] for it in items])
    assert truth["colour"] == 1.0 and truth["position"] == 1.0 and truth["all"] >= 0.9  # the checker works
    shifted = [items[(i + 1) % 60]["combo"] for i in range(60)]
    assert attribute_accuracy(images, shifted)["all"] < 0.3


def test_validation_loss_and_caption_accuracy_plumbing(tmp_path):
    torch.manual_seed(0)
    config = get_preset("dalle-tiny")
    model, dvae = DALLE(config).eval(), DiscreteVAE(get_preset("dvae-tiny")).eval()
    train_tokenizer([caption_of(c) for c in ALL_COMBOS], 64, tmp_path / "tok.json")
    folder = save_pipeline(tmp_path / "final", model, tmp_path / "tok.json", dvae)
    from dalle_ds.inference.generation import load_pipeline

    model, tokenizer = load_pipeline(folder)
    data = SyntheticShapes(6, 32, seed=2)
    batch = {
        "image": torch.stack([data[i]["image"] for i in range(6)]),
        "caption": [data[i]["caption"] for i in range(6)],
    }
    got = validation_loss(model, tokenizer, [batch])
    with torch.no_grad():
        out = model(encode_captions(tokenizer, batch["caption"], config), images=batch["image"])
    assert math.isclose(got["image_loss"], float(out.image_loss), rel_tol=1e-5)
    assert math.isclose(got["text_loss"], float(out.text_loss), rel_tol=1e-5)
    combos = list(ALL_COMBOS[:3])
    scores, images, order = caption_accuracy(model, tokenizer, combos, per_caption=2, top_k=8)
    assert order == [c for c in combos for _ in range(2)] and images.shape == (6, 3, 32, 32)
    assert scores == attribute_accuracy(images, order)
    holdout = tmp_path / "holdout.json"
    holdout.write_text(json.dumps([caption_of(c) for c in combos]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--checkpoint", str(folder), "--num", "16"]
        + ["--holdout", str(holdout), "--per-caption", "1", "--out", str(tmp_path / "eval.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "eval.json").read_text())
    assert set(result) == {"dvae", "validation", "caption_accuracy"}
    assert result["caption_accuracy"]["captions"] == 3 and result["caption_accuracy"]["held_out"]
