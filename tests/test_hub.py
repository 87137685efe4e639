"""Hub export: model card, from_pretrained round trip, pickle refusal, push dry run and no-token stop."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from dalle_ds import DALLE, DiscreteVAE, get_preset
from dalle_ds.data.synthetic import ALL_COMBOS, caption_of
from dalle_ds.data.text import encode_captions, train_tokenizer
from dalle_ds.inference.generation import save_pipeline
from dalle_ds.inference.hub import from_pretrained, write_model_card


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    model = DALLE(get_preset("dalle-tiny")).eval()
    train_tokenizer([caption_of(c) for c in ALL_COMBOS], 64, tmp_path / "tok.json")
    folder = save_pipeline(tmp_path / "final", model, tmp_path / "tok.json", DiscreteVAE(get_preset("dvae-tiny")))
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "grid.png")
    write_model_card(
        folder, {"name": "dalle-tiny", "steps": 10, "repo_id": "me/tiny"}, sample_grid=tmp_path / "grid.png"
    )
    return model, folder


def test_from_pretrained_round_trip_gives_identical_outputs(exported):
    model, folder = exported
    loaded, tokenizer = from_pretrained(str(folder))
    text = encode_captions(tokenizer, ["a red circle at the top left"], loaded.config)
    codes = torch.randint(0, 128, (1, 64))
    with torch.no_grad():
        a, b = model(text, codes, return_logits=True), loaded(text, codes, return_logits=True)
    assert torch.equal(a.image_logits, b.image_logits) and torch.equal(a.text_logits, b.text_logits)
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: dalle-ds\npipeline_tag: text-to-image\n")
    assert "![samples](samples.png)" in card and '"me/tiny"' in card and "| steps | 10 |" in card


def test_pickled_weights_are_refused_unless_asked(exported):
    model, folder = exported
    state = {k: v for k, v in model.state_dict().items()}
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pickled weights"):
        from_pretrained(str(folder))
    loaded, _ = from_pretrained(str(folder), allow_pickle=True)
    assert torch.equal(loaded.image_emb.weight, model.image_emb.weight)


def test_push_dry_run_lists_the_files_and_no_token_stops_before_work(exported, tmp_path):
    _, folder = exported
    script = [sys.executable, str(ROOT / "scripts" / "push_to_hub.py"), str(folder), "--repo-id", "me/tiny"]
    proc = subprocess.run([*script, "--dry-run"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[-1] for line in proc.stdout.splitlines()[:-1]]
    expected = ["README.md", "config.json", "dvae/config.json", "dvae/model.safetensors", "model.safetensors"]
    assert listed == sorted(expected + ["samples.png", "tokenizer.json"])
    assert "7 files -> me/tiny (dry run: nothing uploaded)" in proc.stdout
    env = {**os.environ, "HF_TOKEN": "", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_TOKEN")
    proc = subprocess.run(script, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "no Hugging Face token" in proc.stderr


def test_sharded_pipeline_loads_and_pushes_like_a_single_file_one(exported, tmp_path):
    from dalle_ds.inference.serialization import load_model, save_model

    model, folder = exported
    save_model(model, folder, max_shard_size="150KB")  # the transformer, resharded in place
    assert not (folder / "model.safetensors").exists()
    loaded, tokenizer = from_pretrained(str(folder))
    text = encode_captions(tokenizer, ["a red circle at the top left"], loaded.config)
    codes = torch.randint(0, 128, (1, 64))
    with torch.no_grad():
        assert torch.equal(model(text, codes).loss, loaded(text, codes).loss)
    assert torch.equal(load_model(folder).image_emb.weight, model.image_emb.weight)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "push_to_hub.py"), str(folder), "--repo-id", "me/tiny", "--dry-run"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    listed = [line.split()[-1] for line in proc.stdout.splitlines()[:-1]]
    shards = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(shards) | {"model.safetensors.index.json"} <= set(listed)
    (folder / shards[0]).unlink()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "push_to_hub.py"), str(folder), "--repo-id", "me/tiny", "--dry-run"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and shards[0] in proc.stderr
