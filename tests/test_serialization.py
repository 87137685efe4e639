import os
import pickle
import subprocess
import sys
from pathlib import Path

# OpenAI's reference dVAE classes: a test dependency that scripts/env.sh installs (pip install
# --no-deps dall-e==0.1). Imported plainly so a missing package fails the run instead of skipping
# the compatibility tests (and, at module level, every other test in this file).
import dall_e
import pytest
import torch
import torch.nn.functional as F

import dalle_ds
from dalle_ds import DALLE, DalleConfig, DiscreteVAE, get_preset
from dalle_ds.inference.serialization import (
    UnsafeCheckpointError,
    load_dvae,
    load_model,
    openai_dvae_state_dict,
    read_openai_pickle,
    save_model,
)

ROOT = Path(__file__).resolve().parents[1]


def test_openai_default_dvae_state_dict_loads_into_ours_with_identical_outputs():
    torch.manual_seed(0)
    enc, dec = dall_e.Encoder(), dall_e.Decoder()
    ours = DiscreteVAE(get_preset("dvae-paper"))
    ours.encoder.load_state_dict(openai_dvae_state_dict(enc.state_dict()), strict=True)
    ours.decoder.load_state_dict(openai_dvae_state_dict(dec.state_dict()), strict=True)
    # Fully convolutional: a 64x64 input exercises every weight at 1/16 of the cost of 256x256.
    x = dall_e.map_pixels(torch.rand(2, 3, 64, 64))
    with torch.no_grad():
        logits = enc(x)
        torch.testing.assert_close(ours.encoder(x), logits, atol=1e-5, rtol=1e-5)
        z = F.one_hot(logits.argmax(1), 8192).permute(0, 3, 1, 2).float()
        torch.testing.assert_close(ours.decoder(z), dec(z), atol=1e-5, rtol=1e-5)


def test_openai_pickles_convert_through_the_script(tmp_path):
    torch.manual_seed(1)
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    dec = dall_e.Decoder(n_init=32, n_hid=64, n_blk_per_group=1, vocab_size=512)
    torch.save(enc, tmp_path / "encoder.pkl")  # what OpenAI released: whole pickled modules
    torch.save(dec, tmp_path / "decoder.pkl")
    out = tmp_path / "converted"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts/convert_openai_dvae.py"),
            "--encoder",
            str(tmp_path / "encoder.pkl"),
            "--decoder",
            str(tmp_path / "decoder.pkl"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    vae = load_dvae(out)
    assert (vae.config.n_hid, vae.config.codebook_size, vae.config.n_init, vae.config.group_count) == (64, 512, 32, 4)
    x = dall_e.map_pixels(torch.rand(1, 3, 32, 32))
    z = F.one_hot(torch.randint(0, 512, (1, 4, 4)), 512).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        torch.testing.assert_close(vae.encoder(x), enc(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(vae.decoder(z), dec(z), atol=1e-5, rtol=1e-5)


class _Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_that_run_code_or_hold_unknown_classes_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = _Exploit()
    evil.marker = marker
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"blocks": evil}, f)
    with pytest.raises(UnsafeCheckpointError, match="evil.pkl: refused to unpickle"):
        read_openai_pickle(tmp_path / "evil.pkl")
    torch.save(evil, tmp_path / "evil2.pkl")
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        read_openai_pickle(tmp_path / "evil2.pkl")
    assert not marker.exists(), "the pickle ran code"
    torch.save(torch.nn.Linear(2, 2), tmp_path / "linear.pkl")
    with pytest.raises(UnsafeCheckpointError, match="refused"):
        read_openai_pickle(tmp_path / "linear.pkl")


@pytest.mark.parametrize("name", ["dalle-tiny", "dvae-tiny"])
def test_save_load_round_trip_gives_identical_outputs(name, tmp_path):
    cfg = get_preset(name)
    model = (DALLE if isinstance(cfg, DalleConfig) else DiscreteVAE)(cfg).eval()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config == cfg
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b)
    if isinstance(cfg, DalleConfig):
        text = torch.randint(0, cfg.text_vocab_size, (2, cfg.text_len))
        codes = torch.randint(0, cfg.image_vocab_size, (2, cfg.image_len))
        assert torch.equal(model(text, codes).loss, loaded(text, codes).loss)
    else:
        x = torch.rand(2, 3, cfg.image_size, cfg.image_size)
        assert torch.equal(model.encode(x), loaded.encode(x))
    assert not list((tmp_path / "m").glob(".*tmp")), "temp files left behind"


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load_model(tmp_path)
    save_model(DALLE(get_preset("dalle-tiny")), tmp_path / "d")
    with pytest.raises(dalle_ds.ConfigError, match="holds a DALLE"):
        load_dvae(tmp_path / "d")


def test_sharded_and_single_file_folders_load_to_identical_outputs(tmp_path):
    import json

    from dalle_ds.inference.serialization import INDEX_NAME, weight_files

    torch.manual_seed(0)
    model = DALLE(get_preset("dalle-tiny")).eval()
    save_model(model, tmp_path / "single")
    save_model(model, tmp_path / "sharded", max_shard_size="100KB")
    shards = weight_files(tmp_path / "sharded")
    assert [p.name for p in weight_files(tmp_path / "single")] == ["model.safetensors"]
    n = len(shards)
    assert n > 3 and [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())
    sizes = {k: v.numel() * v.element_size() for k, v in model.state_dict().items()}
    assert set(index["weight_map"]) == set(sizes) and index["metadata"]["total_size"] == sum(sizes.values())
    for shard in shards:  # at most 100 KB of tensors, unless one tensor alone is larger
        held = [k for k, f in index["weight_map"].items() if f == shard.name]
        assert sum(sizes[k] for k in held) <= 100_000 or len(held) == 1, (shard.name, held)
    a, b = load_model(tmp_path / "single"), load_model(tmp_path / "sharded")
    text = torch.randint(0, a.config.text_vocab_size, (2, a.config.text_len))
    codes = torch.randint(0, a.config.image_vocab_size, (2, a.config.image_len))
    with torch.no_grad():
        la, lb = a(text, codes, return_logits=True), b(text, codes, return_logits=True)
    assert torch.equal(la.image_logits, lb.image_logits) and torch.equal(la.text_logits, lb.text_logits)
    # Saving again in the other layout replaces the weight files instead of leaving both.
    save_model(model, tmp_path / "sharded")
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == ["config.json", "model.safetensors"]
    save_model(model, tmp_path / "single", max_shard_size="100KB")
    assert not (tmp_path / "single" / "model.safetensors").exists() and len(weight_files(tmp_path / "single")) == n


def test_sharded_load_errors_name_the_missing_shard_or_weight(tmp_path):
    import json

    from dalle_ds.inference.serialization import INDEX_NAME

    save_model(DALLE(get_preset("dalle-tiny")), tmp_path / "m", max_shard_size="100KB")
    index_path = tmp_path / "m" / INDEX_NAME
    index = json.loads(index_path.read_text())
    (tmp_path / "m" / "model-00002-of-00018.safetensors").rename(tmp_path / "moved.safetensors")
    with pytest.raises(FileNotFoundError, match="names shards that are missing.*model-00002-of"):
        load_model(tmp_path / "m")
    (tmp_path / "moved.safetensors").rename(tmp_path / "m" / "model-00002-of-00018.safetensors")
    last = sorted(set(index["weight_map"].values()))[-1]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != last}
    index_path.write_text(json.dumps(index))
    with pytest.raises(dalle_ds.ConfigError, match="weights missing from"):
        load_model(tmp_path / "m")
    index_path.write_text("{}")
    with pytest.raises(dalle_ds.ConfigError, match="not a safetensors index"):
        load_model(tmp_path / "m")
