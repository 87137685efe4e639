"""FID and CLIP score (dalle_ds.inference.metrics, torchmetrics underneath) against direct computations,
with a small injected feature extractor and a tiny random CLIP (the real Inception is never run here:
it needs torch-fidelity, a matching torchvision and a download); generate_and_score with a stand-in
sampler; the errors when the Inception cannot be built; evaluate.py --fid --clip-score end to end."""

import json
import math
import os
import subprocess
import sys
import types
import urllib.error

import numpy as np
import pytest
import torch
from conftest import ROOT, save_clip
from fid_features import PooledLinear

import dalle_ds.inference.generation as generation
import dalle_ds.inference.metrics as metrics
from dalle_ds import DALLE, DiscreteVAE, get_preset
from dalle_ds.data.synthetic import ALL_COMBOS, caption_of, write_webdataset
from dalle_ds.data.text import train_tokenizer
from dalle_ds.inference.generation import save_pipeline
from dalle_ds.inference.metrics import (
    MetricUnavailableError,
    clip_score_metric,
    fid_metric,
    generate_and_score,
    load_feature_extractor,
)
from dalle_ds.utils.seeding import derive_seed


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tok.json"
    train_tokenizer([caption_of(c) for c in ALL_COMBOS], 64, path)
    return path


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory, tok_file):
    """A tiny randomly initialised CLIP, saved like a hub model (as in test_generation.py), with its
    text projection negated: this random CLIP's image and text embeddings point apart (every cosine
    < 0), so unflipped its CLIP scores would all clamp to 0 and hide what is compared."""
    return save_clip(tmp_path_factory.mktemp("clip"), tok_file, flip_text=True)


def fid_closed_form(f1: np.ndarray, f2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), Tr sqrtm(S1 S2) = Tr sqrtm(S1^1/2 S2 S1^1/2)
    (a symmetric PSD matrix with the same eigenvalues), in float64 with numpy."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    s1_half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(s1_half @ s2 @ s1_half), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross)


def images(n, seed, power=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 32, 32, generator=g) ** power


def test_fid_of_identical_sets_is_zero_and_of_a_shifted_set_is_the_squared_shift():
    extractor = PooledLinear()
    real = images(64, 1)
    fid = fid_metric(feature_extractor=extractor)
    for part in real.split(20):  # streamed in uneven batches
        fid.update(part, real=True)
    fid.update(real, real=False)
    assert abs(float(fid.compute())) < 1e-3
    shift = 0.25  # the same mean shift on every pixel: every feature vector moves by d, covariances stay
    fid = fid_metric(feature_extractor=extractor)
    fid.update(real, real=True)
    fid.update(real + shift, real=False)
    d2 = float((extractor.shift_of(shift).double() ** 2).sum())
    assert d2 > 1.0
    assert math.isclose(float(fid.compute()), d2, rel_tol=1e-4, abs_tol=1e-3)


def test_fid_matches_the_closed_form_on_different_distributions():
    extractor = PooledLinear()
    real, fake = images(80, 2), images(50, 3, power=2.5) * 0.8
    fid = fid_metric(feature_extractor=extractor)
    fid.update(real[:33], real=True)
    fid.update(real[33:], real=True)
    fid.update(fake, real=False)
    with torch.no_grad():
        expected = fid_closed_form(extractor(real).double().numpy(), extractor(fake).double().numpy())
    assert expected > 1.0
    assert math.isclose(float(fid.compute()), expected, rel_tol=1e-4)


def test_feature_extractor_loads_from_module_colon_callable():
    extractor = load_feature_extractor("fid_features:make")
    assert isinstance(extractor, PooledLinear)
    torch.testing.assert_close(extractor.weight, PooledLinear().weight)
    with pytest.raises(ValueError, match="module:callable"):
        load_feature_extractor("fid_features.make")
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        load_feature_extractor("builtins:dict")


def direct_clip_cosines(clip_dir, images_uint8, captions):
    """100 * cos(image, caption embedding) per pair, computed with transformers directly."""
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    model = CLIPModel.from_pretrained(clip_dir).eval()
    pixels = CLIPImageProcessor.from_pretrained(clip_dir)(images=list(images_uint8), return_tensors="pt")
    text = AutoTokenizer.from_pretrained(clip_dir)(captions, padding=True, return_tensors="pt")
    with torch.no_grad():
        img = model.vision_model(pixel_values=pixels["pixel_values"]).pooler_output
        img = model.visual_projection(img)
        txt = model.text_model(input_ids=text["input_ids"], attention_mask=text["attention_mask"]).pooler_output
        txt = model.text_projection(txt)
    return 100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1)


def test_clip_score_is_the_clamped_mean_cosine_of_a_direct_computation(clip_dir, tok_file, tmp_path):
    g = torch.Generator().manual_seed(4)
    pool = torch.randint(0, 256, (12, 3, 32, 32), generator=g, dtype=torch.uint8)
    captions = [caption_of(ALL_COMBOS[i * 5 % len(ALL_COMBOS)]) for i in range(12)]
    cos = direct_clip_cosines(clip_dir, pool, captions)
    assert len(set(cos.round(decimals=3).tolist())) == 12 and cos.mean() > 1, cos
    # torchmetrics: max(mean over pairs of 100 * cos, 0), accumulated over updates.
    metric = clip_score_metric(str(clip_dir))
    metric.update(pool[:5], captions[:5])
    metric.update(pool[5:], captions[5:])
    assert math.isclose(float(metric.compute()), float(cos.mean()), rel_tol=1e-4)
    # The unflipped model: every cosine is the negative of the above; the mean clamps to 0.
    unflipped = save_clip(tmp_path / "unflipped", tok_file, flip_text=False)
    torch.testing.assert_close(direct_clip_cosines(unflipped, pool, captions), -cos, rtol=1e-4, atol=1e-4)
    metric = clip_score_metric(str(unflipped))
    metric.update(pool, captions)
    assert float(metric.compute()) == 0.0


def test_missing_torch_fidelity_names_the_eval_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # `import torch_fidelity` fails
    with pytest.raises(MetricUnavailableError, match=r"dalle-ds\[eval\]") as info:
        fid_metric()
    assert "torchvision" in str(info.value)


def test_inception_download_failure_names_the_weights_and_the_offline_option(monkeypatch, tmp_path):
    """Stands in for torch-fidelity failing to download (this machine is offline and has no
    torch-fidelity): the library call raises what urllib raises."""
    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    seen = {}

    def offline(**kwargs):
        seen.update(kwargs)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(metrics, "_library_fid", offline)
    with pytest.raises(MetricUnavailableError) as info:
        fid_metric()
    msg = str(info.value)
    assert seen == {"feature": 2048, "normalize": True, "feature_extractor_weights_path": None}
    assert "FID Inception weights" in msg and "--fid-weights" in msg and "name resolution" in msg
    assert metrics.INCEPTION_URL in msg
    assert os.path.join(torch.hub.get_dir(), "checkpoints", "weights-inception-2015-12-05-6726825d.pth") in msg
    with pytest.raises(MetricUnavailableError, match="no such file"):
        fid_metric(weights_path=tmp_path / "missing.pth")
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"")
    monkeypatch.setattr(metrics, "_library_fid", lambda **kw: seen.update(kw) or torch.nn.Identity())
    fid_metric(weights_path=weights)  # a local copy goes to torchmetrics' feature_extractor_weights_path
    assert seen["feature_extractor_weights_path"] == weights


def stream(real, captions, batch):
    for start in range(0, len(captions), batch):
        yield {"image": (real[start : start + batch] * 255).round().to(torch.uint8),
               "caption": captions[start : start + batch]}  # fmt: skip


def test_generate_and_score_feeds_real_and_generated_images(monkeypatch, clip_dir):
    """A stand-in sampler that 'generates' each caption's real image: FID ~ 0 and the CLIP score of
    the samples is the real images' one; 7 of a 9-pair stream, one seed per caption index."""
    real = (images(9, 5) * 255).round() / 255  # exactly representable as uint8, as the stream sends it
    captions = [caption_of(c) for c in ALL_COMBOS[:9]]
    by_caption, calls = dict(zip(captions, real, strict=True)), []

    def fake_sample_images(model, tokenizer, caption, n, batch_size=16, seed=0, **sampling):
        calls.append((caption, n, seed, sampling))
        return by_caption[caption][None].expand(n, -1, -1, -1).clone(), None

    monkeypatch.setattr(generation, "sample_images", fake_sample_images)
    fid, clip = fid_metric(feature_extractor=PooledLinear()), clip_score_metric(str(clip_dir))
    got = generate_and_score(None, None, stream(real, captions, 4), 7, fid=fid, clip=clip, seed=3, top_k=8)
    assert [c[0] for c in calls] == captions[:7]
    assert [c[2] for c in calls] == [derive_seed(3, i) for i in range(7)]
    assert all(n == 1 and s == {"top_k": 8} for _, n, _, s in calls)
    assert got["samples"] == 7 and got["candidates"] == 1 and not got["reranked"]
    assert abs(got["fid"]) < 1e-3
    assert math.isclose(got["clip_score"], got["real_clip_score"], rel_tol=1e-5, abs_tol=1e-6)


def test_candidates_keep_the_clip_best_sample(monkeypatch, clip_dir):
    real = (images(6, 6) * 255).round() / 255
    captions = [caption_of(c) for c in ALL_COMBOS[10:16]]
    made = {}

    def fake_sample_images(model, tokenizer, caption, n, batch_size=16, seed=0, **sampling):
        made[caption] = images(n, seed % 2**31)
        return made[caption], None

    monkeypatch.setattr(generation, "sample_images", fake_sample_images)
    extractor = PooledLinear()
    fid, clip = fid_metric(feature_extractor=extractor), clip_score_metric(str(clip_dir))
    got = generate_and_score(None, None, stream(real, captions, 6), 6, fid=fid, clip=clip, candidates=4)
    assert got["reranked"] and got["candidates"] == 4 and got["samples"] == 6
    # Expected: per caption, the candidate with the highest CLIP image-text score, by a direct computation.
    best = []
    for caption in captions:
        scores = direct_clip_cosines(clip_dir, (made[caption] * 255).round().to(torch.uint8), [caption] * 4)
        best.append(made[caption][int(scores.argmax())])
    with torch.no_grad():
        expected = fid_closed_form(extractor(real).double().numpy(), extractor(torch.stack(best)).double().numpy())
    assert math.isclose(got["fid"], expected, rel_tol=1e-4)
    with pytest.raises(ValueError, match="CLIP"):
        generate_and_score(None, None, stream(real, captions, 6), 6, candidates=2)


def test_evaluate_script_reports_fid_and_clip_score_on_a_stream(tmp_path, tok_file, clip_dir):
    torch.manual_seed(0)
    folder = save_pipeline(tmp_path / "final", DALLE(get_preset("dalle-tiny")), tok_file,
                           DiscreteVAE(get_preset("dvae-tiny")))  # fmt: skip
    write_webdataset(tmp_path / "shards", 12, shards=2, image_size=40, seed=7)  # resized to the model's 32
    out = tmp_path / "eval.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--checkpoint", str(folder)]
    cmd += ["--data", str(tmp_path / "shards"), "--num", "6", "--batch-size", "4", "--fid", "--clip-score"]
    cmd += ["--clip-model", str(clip_dir), "--fid-feature-extractor", "fid_features:make", "--candidates", "2"]
    cmd += ["--top-k", "8", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    gen = result["generation"]
    assert {"dvae", "validation", "generation"} <= set(result)
    assert gen["samples"] == 6 and gen["candidates"] == 2 and gen["reranked"]
    assert gen["clip_model"] == str(clip_dir) and gen["fid_features"] == "fid_features:make"
    assert math.isfinite(gen["fid"]) and gen["fid"] > 0  # a random model's samples are not the shapes
    assert math.isfinite(result["dvae"]["rfid"]) and result["dvae"]["rfid"] > 0  # the tokenizer's reconstructions
    for key in ("clip_score", "real_clip_score"):
        assert 0 < gen[key] <= 100, gen  # > 0: the fixture's CLIP scores every pair positive
    # The standard Inception without torch-fidelity (hidden here, whether installed or not): the install
    # hint, before any model is loaded.
    hide = tmp_path / "no_fidelity"
    hide.mkdir()
    (hide / "torch_fidelity.py").write_text("raise ImportError('hidden by the test')\n")
    cmd = [sys.executable, str(ROOT / "scripts" / "evaluate.py"), "--checkpoint", str(folder), "--fid"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**env, "PYTHONPATH": str(hide)})
    assert proc.returncode == 2 and "dalle-ds[eval]" in proc.stderr, proc.stderr[-3000:]
