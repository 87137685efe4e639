"""One image-tokenizer protocol for the dVAE and the VQGAN, at every entry point that takes one: the
saved folder (``load_dvae``), the transformer's grid/codebook check, ``encode_images.py``, pipeline
folders with sampling and ``from_pretrained`` and the hub card, ``evaluate.py --dvae`` (PSNR,
codebook use, rFID) and the dry run; and a tiny DALL-E trained on a tiny VQGAN's codes end to end."""

import json
import math
import os

import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_script_main
from launching import ds_config, train_args

from dalle_ds import DALLE, VQGAN, DiscreteVAE, get_preset, load_dvae, save_model
from dalle_ds.data.synthetic import ALL_COMBOS, caption_of, write_webdataset
from dalle_ds.data.text import train_tokenizer
from dalle_ds.inference.generation import sample_images, save_pipeline
from dalle_ds.inference.hub import from_pretrained, write_model_card

TOKENIZERS = {"dvae": (DiscreteVAE, "dvae-tiny"), "vqgan": (VQGAN, "vqgan-tiny")}  # both: 32 px, 8x8 codes, 128


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer_dir(request, tmp_path_factory):
    cls, preset = TOKENIZERS[request.param]
    torch.manual_seed(0)
    return save_model(cls(get_preset(preset)), tmp_path_factory.mktemp(request.param) / "tokenizer")


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "tok.json"
    train_tokenizer([caption_of(c) for c in ALL_COMBOS], 64, path)
    return path


def kind(folder) -> str:
    return json.loads((folder / "config.json").read_text())["model_type"]


def test_the_saved_folder_loads_as_a_tokenizer_with_its_grid_and_codebook(tokenizer_dir):
    tok = load_dvae(tokenizer_dir)
    assert type(tok) is TOKENIZERS[kind(tokenizer_dir)][0]
    assert (tok.config.image_size, tok.config.grid_size, tok.config.codebook_size) == (32, 8, 128)
    images = torch.rand(3, 3, 32, 32)
    codes = tok.encode(images)
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.int64
    assert 0 <= int(codes.min()) and int(codes.max()) < 128
    pixels = tok.decode(codes)
    assert pixels.shape == (3, 3, 32, 32) and 0 <= float(pixels.min()) and float(pixels.max()) <= 1
    torch.testing.assert_close(tok.decode(codes.flatten(1)), pixels)  # (B, h*w) codes too
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)|channels"):
        tok.encode(torch.rand(2, 1, 32, 32))


def test_a_transformer_of_another_grid_or_codebook_is_refused_naming_both(tokenizer_dir):
    tok = load_dvae(tokenizer_dir)
    name = {"dvae": "dVAE", "vqgan": "VQGAN"}[kind(tokenizer_dir)]
    with pytest.raises(ValueError, match=rf"{name} grid 8 != DalleConfig.image_grid=16"):
        DALLE(get_preset("dalle-small")).set_dvae(tok)
    with pytest.raises(ValueError, match=rf"{name} codebook 128 != DalleConfig.image_vocab_size=256"):
        DALLE(get_preset("dalle-tiny").replace(image_vocab_size=256)).set_dvae(tok)


def test_encode_images_writes_the_tokenizers_codes(tokenizer_dir, tmp_path):
    from dalle_ds.data import DataConfig, StreamLoader
    from dalle_ds.utils.images import as_float_image

    write_webdataset(tmp_path / "shards", 10, shards=2, image_size=32, seed=3)
    run_script_main("encode_images.py", "--dvae", tokenizer_dir, "--data", tmp_path / "shards",
                    "--out", tmp_path / "codes", "--batch-size", 4, "--workers", 0)  # fmt: skip
    rows = pq.read_table(tmp_path / "codes" / "codes-r0000-00000.parquet").to_pydict()
    loader = StreamLoader(DataConfig(str(tmp_path / "shards"), image_size=32, augment=False, shuffle_buffer=1,
                                     drop_last=False), 4, 0, 1, 0, epochs=1)  # fmt: skip
    tok = load_dvae(tokenizer_dir)
    want = {}
    for batch in loader:
        encoded = tok.encode(as_float_image(batch["image"])).flatten(1).tolist()
        for caption, codes in zip(batch["caption"], encoded, strict=True):
            want.setdefault(caption, []).append(codes)
    assert len(rows["caption"]) == 10
    for caption, codes in zip(rows["caption"], rows["codes"], strict=True):
        assert codes in want[caption]


def test_a_pipeline_samples_loads_from_pretrained_and_names_its_tokenizer_on_the_card(tokenizer_dir, tok_file,
                                                                                       tmp_path):  # fmt: skip
    torch.manual_seed(1)
    folder = save_pipeline(tmp_path / "final", DALLE(get_preset("dalle-tiny")), tok_file, load_dvae(tokenizer_dir))
    write_model_card(folder, {"name": "tiny"})
    model, tokenizer = from_pretrained(str(folder))
    assert type(model.dvae) is TOKENIZERS[kind(tokenizer_dir)][0]
    images, codes = sample_images(model, tokenizer, "a red circle at the top left", 2, top_k=8, seed=0)
    assert images.shape == (2, 3, 32, 32) and codes.shape == (2, 64)
    torch.testing.assert_close(images, model.dvae.decode(codes))
    card = (folder / "README.md").read_text()
    name = {"dvae": "dVAE", "vqgan": "VQGAN"}[kind(tokenizer_dir)]
    assert f"{name} image codes" in card and f"| model_type | {kind(tokenizer_dir)} |" in card
    assert "| grid | 8x8 |" in card and "| codebook_size | 128 |" in card


def test_evaluate_reports_psnr_codebook_use_and_rfid(tokenizer_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(__file__))  # fid_features: a small stand-in extractor
    out = tmp_path / "eval.json"
    run_script_main("evaluate.py", "--dvae", tokenizer_dir, "--num", 12, "--batch-size", 6, "--fid",
                    "--fid-feature-extractor", "fid_features:make", "--out", out)  # fmt: skip
    metrics = json.loads(out.read_text())["dvae"]
    tok = load_dvae(tokenizer_dir)
    assert math.isfinite(metrics["psnr"]) and metrics["mse"] == pytest.approx(10 ** (-metrics["psnr"] / 10))
    assert 0 < metrics["usage"] <= 1 and metrics["dead_codes"] == round(128 * (1 - metrics["usage"]))
    assert math.isfinite(metrics["rfid"]) and metrics["rfid"] > 0  # random tokenizers reconstruct badly
    assert tok.config.codebook_size == 128


def test_the_dry_run_counts_the_frozen_tokenizer(tokenizer_dir, capsys):
    args = ["--preset", "dalle-tiny", "--deepspeed_config", "ds_configs/cpu_zero2_fp32.json", "--gpus-per-node", 1,
            "--gpu-memory", "8GB", "--micro-batch-size", 2, "--dvae", tokenizer_dir, "--json"]  # fmt: skip
    assert run_script_main("plan_run.py", *args) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    params = sum(p.numel() for p in load_dvae(tokenizer_dir).parameters())
    assert plan["components"]["dvae"] == 4 * params


def test_a_tiny_dalle_trains_on_a_tiny_vqgans_codes_end_to_end(tmp_path, single_process_group):
    from dalle_ds.training import DalleRunConfig, parse_run_config
    from dalle_ds.training.dalle_trainer import DalleTrainer

    torch.manual_seed(0)
    vqgan = save_model(VQGAN(get_preset("vqgan-tiny")), tmp_path / "vqgan")
    out = tmp_path / "dalle"
    args = train_args(vqgan, out, ds_config(tmp_path, 2), "--save-every", 3, "--bpe-dropout", 0)
    DalleTrainer(parse_run_config(DalleRunConfig, [str(a) for a in args])).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    model, tokenizer = from_pretrained(str(out / "final"))
    assert isinstance(model.dvae, VQGAN) and model.dvae.config == get_preset("vqgan-tiny")
    images, codes = sample_images(model, tokenizer, "a blue square at the bottom right", 2, top_k=8, seed=1)
    assert images.shape == (2, 3, 32, 32) and int(codes.max()) < 128
