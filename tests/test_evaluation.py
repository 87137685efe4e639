"""Evaluation metrics against direct computations, the attribute checker and caption accuracy on images
whose attributes are known by construction, evaluate.py."""

import dataclasses
import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT

from dalle_ds import DALLE, DiscreteVAE, get_preset
from dalle_ds.data.synthetic import ALL_COMBOS, Combo, SyntheticShapes, caption_of, read_attributes, render
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


def as_tensor(img):
    """A rendered PIL image as the dataset hands it out: float (3, S, S) in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255


@pytest.mark.parametrize("image_size", [32, 36, 64])  # the tiny presets', the demo's, dvae-small's
def test_read_attributes_recovers_every_drawn_combination(image_size):
    for seed in range(3):  # the drawing code's position and size jitter
        for combo in ALL_COMBOS:
            img = render(combo, image_size, random.Random(seed))
            assert read_attributes(img) == combo, (combo, image_size, seed)
            assert read_attributes(as_tensor(img)) == combo, (combo, image_size, seed)


def other(combo, **change):
    return Combo(**{**dataclasses.asdict(combo), **change})


def test_attribute_accuracy_scores_wrong_images_wrong():
    target = Combo("red", "square", "top left")
    blank = torch.ones(3, 32, 32)
    drawn = {
        "right": target,
        "colour": other(target, colour="blue"),
        "shape": other(target, shape="circle"),
        "position": other(target, position="bottom right"),
    }
    images = {k: as_tensor(render(c, 32)) for k, c in drawn.items()}
    expected = {  # what each image gets right when scored against target
        "right": {"colour": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0},
        "colour": {"colour": 0.0, "shape": 1.0, "position": 1.0, "all": 0.0},
        "shape": {"colour": 1.0, "shape": 0.0, "position": 1.0, "all": 0.0},
        "position": {"colour": 1.0, "shape": 1.0, "position": 0.0, "all": 0.0},
    }
    for key, image in images.items():
        assert attribute_accuracy(image[None], [target]) == expected[key], key
    assert read_attributes(blank) is None
    assert attribute_accuracy(blank[None], [target]) == {"colour": 0.0, "shape": 0.0, "position": 0.0, "all": 0.0}
    # Mixed: 1 right, 3 with one attribute wrong, 1 blank, out of 5.
    batch = torch.stack([*images.values(), blank])
    assert attribute_accuracy(batch, [target] * 5) == {"colour": 0.6, "shape": 0.6, "position": 0.6, "all": 0.2}


def test_caption_accuracy_scores_known_samples(monkeypatch):
    """caption_accuracy with a stand-in sampler whose images are known: per combo, one image drawn
    as asked and one drawn wrong (another colour, shape or position, or blank)."""
    import dalle_ds.inference.generation as generation

    combos = [Combo("red", "circle", "top"), Combo("green", "triangle", "left"), Combo("blue", "square", "center")]
    wrong = {
        combos[0]: other(combos[0], colour="yellow"),
        combos[1]: other(combos[1], position="bottom"),
        combos[2]: None,  # blank
    }
    by_caption = {caption_of(c): c for c in combos}
    calls = []

    def fake_sample_images(model, tokenizer, caption, n, seed=0, **sampling):
        calls.append((caption, n, seed, sampling))
        combo = by_caption[caption]
        bad = wrong[combo]
        return torch.stack(
            [as_tensor(render(combo, 32)), as_tensor(render(bad, 32)) if bad else torch.ones(3, 32, 32)]
        ), None

    monkeypatch.setattr(generation, "sample_images", fake_sample_images)
    scores, images, order = caption_accuracy(None, None, combos, per_caption=2, seed=5, top_k=8)
    assert [c[0] for c in calls] == [caption_of(c) for c in combos]
    assert all(n == 2 and sampling == {"top_k": 8} for _, n, _, sampling in calls)
    assert len({seed for _, _, seed, _ in calls}) == 3  # a different sampling seed per caption
    assert order == [c for c in combos for _ in range(2)] and images.shape == (6, 3, 32, 32)
    # 3 of 6 images all right; colour wrong in the yellow one and the blank, shape in the blank, position
    # in the moved one and the blank.
    assert scores == {"colour": 4 / 6, "shape": 5 / 6, "position": 4 / 6, "all": 3 / 6}


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
    assert images.min() >= 0 and images.max() <= 1
    assert set(scores) == {"colour", "shape", "position", "all"}
    for value in scores.values():  # shares of 6 images
        assert 0 <= value <= 1 and math.isclose(value * 6, round(value * 6))
    assert scores["all"] <= min(scores["colour"], scores["shape"], scores["position"])
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
