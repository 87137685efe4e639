"""The README's first command: the end-to-end demo (deepspeed-launched dVAE and DALL-E, held-out
captions sampled and read back)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dalle_ds.data.synthetic import caption_of, holdout_combos

ROOT = Path(__file__).resolve().parent.parent

# Measured floors for the default demo (README states the figures); see test_demo_default_run.
HELDOUT_ALL_FLOOR = 0.70
CODEBOOK_USE_FLOOR = 0.90


def run_demo(out: Path, *args, timeout: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--out", str(out), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_demo_plumbing_on_a_short_schedule(tmp_path):
    """3 + 3 training steps, 3 held-out captions x 2 samples: every artefact the demo promises, with
    the shapes and counts those settings imply and numbers that agree with each other."""
    proc = run_demo(tmp_path, "--dvae-steps", 3, "--dalle-steps", 3, "--holdout", 3, "--per-caption", 2,
                    "--batch-size", 8, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    held = [caption_of(c) for c in holdout_combos(3)]

    # Both stages trained exactly 3 steps on the demo presets, holding out the 3 captions.
    for stage in ("dvae", "dalle"):
        metrics = [json.loads(line) for line in (tmp_path / stage / "metrics.jsonl").read_text().splitlines()]
        assert metrics and metrics[-1]["step"] == 3, (stage, metrics[-1:])
    assert json.loads((tmp_path / "dalle" / "holdout.json").read_text()) == held
    dvae_cfg = json.loads((tmp_path / "dvae" / "final" / "config.json").read_text())
    dalle_cfg = json.loads((tmp_path / "dalle" / "final" / "config.json").read_text())
    assert (dvae_cfg["image_size"], dvae_cfg["codebook_size"], dvae_cfg["quantizer"]) == (36, 128, "vq")
    assert (dalle_cfg["image_grid"], dalle_cfg["image_vocab_size"]) == (9, 128)
    assert (tmp_path / "dalle" / "final" / "tokenizer.json").exists()

    # Images: the data preview (32 training images, 8 per row) and one row of 2 samples per caption.
    assert Image.open(tmp_path / "data_preview.png").size == (8 * 38 + 2, 4 * 38 + 2)
    grid = np.asarray(Image.open(tmp_path / "heldout_samples.png").convert("RGB"))
    assert grid.shape == (3 * 38 + 2, 2 * 38 + 2, 3)  # 3 caption rows x 2 samples of 36 px, 2 px padding
    cells = [grid[2 + 38 * r : 38 * (r + 1), 2 + 38 * c : 38 * (c + 1)] for r in range(3) for c in range(2)]
    assert all(cell.shape == (36, 36, 3) and not (cell == 128).all() for cell in cells)  # a sample in every cell
    assert (grid[:2] == 128).all() and (grid[:, :2] == 128).all()  # padding around them
    expected_rows = [f"row {i + 1}: {caption}" for i, caption in enumerate(held)]
    assert (tmp_path / "heldout_samples.txt").read_text().splitlines() == expected_rows

    results = json.loads((tmp_path / "results.json").read_text())
    keys = ("heldout_accuracy", "heldout_accuracy_temperature_1", "heldout_captions", "samples", "dvae", "timings")
    assert set(results) == {*keys, "settings"}
    assert results["samples"] == 6 and results["heldout_captions"] == 3
    wanted = {"dvae_steps": 3, "dalle_steps": 3, "holdout": 3, "per_caption": 2, "batch_size": 8, "temperature": 0.5}
    assert {k: results["settings"][k] for k in wanted} == wanted
    for key in ("heldout_accuracy", "heldout_accuracy_temperature_1"):
        acc = results[key]
        assert set(acc) == {"colour", "shape", "position", "all"}, key
        for value in acc.values():  # shares of the 6 samples
            assert 0 <= value <= 1 and math.isclose(value * 6, round(value * 6)), (key, acc)
        assert acc["all"] <= min(acc["colour"], acc["shape"], acc["position"]), (key, acc)
    acc, acc_t1 = results["heldout_accuracy"], results["heldout_accuracy_temperature_1"]
    assert f"every attribute right: {100 * acc['all']:.1f}%" in proc.stdout
    assert (
        f"colour {100 * acc['colour']:.1f}%, shape {100 * acc['shape']:.1f}%, position {100 * acc['position']:.1f}%"
        f"  (temperature 0.5; at 1.0: {100 * acc_t1['all']:.1f}% all right)"
    ) in proc.stdout

    tok = results["dvae"]
    assert set(tok) == {"mse", "psnr", "perplexity", "usage", "dead_codes"}
    assert 0 < tok["usage"] <= 1 and math.isclose(tok["usage"], (128 - tok["dead_codes"]) / 128)
    assert math.isclose(tok["psnr"], 10 * math.log10(1 / tok["mse"]), rel_tol=1e-9)
    assert 1 <= tok["perplexity"] <= 128 * tok["usage"] + 1e-6  # at most the number of codes in use
    assert f"{100 * tok['usage']:.1f}% of the codebook in use ({tok['dead_codes']} dead codes)" in proc.stdout

    timings = results["timings"]
    assert set(timings) == {"dvae_s", "dalle_s", "sample_eval_s", "total_s"}
    assert all(v > 0 for v in timings.values())
    assert timings["total_s"] >= timings["dvae_s"] + timings["dalle_s"] + timings["sample_eval_s"] - 0.2


@pytest.mark.slow
@pytest.mark.timeout(2400)  # ~14 min alone on 2 cores; the suite's 900 s per-test limit is too short
def test_demo_default_run_reaches_its_measured_accuracy(tmp_path):
    proc = run_demo(tmp_path, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    print(json.dumps(results, indent=1))
    assert results["heldout_accuracy"]["all"] >= HELDOUT_ALL_FLOOR, results["heldout_accuracy"]
    assert results["dvae"]["usage"] >= CODEBOOK_USE_FLOOR, results["dvae"]
