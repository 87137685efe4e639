import pytest
import torch

from dalle_ds import (
    PRESETS,
    ConfigError,
    DalleConfig,
    DVAEConfig,
    get_preset,
    load_config,
    save_config,
)
from dalle_ds.models.tokenizer import build_model


def count_on_meta(cfg):
    with torch.device("meta"):
        model = build_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    return sum(p.numel() for p in model.parameters())


def test_dalle_12b_has_12_billion_parameters_on_meta():
    cfg = get_preset("dalle-12b")
    assert (cfg.n_layers, cfg.n_heads, cfg.head_dim, cfg.d_model) == (64, 62, 64, 3968)
    assert (cfg.text_len, cfg.text_vocab_size, cfg.image_grid, cfg.image_vocab_size) == (256, 16384, 32, 8192)
    assert cfg.seq_len == 1280
    n = count_on_meta(cfg)
    assert abs(n - 12.0e9) / 12.0e9 <= 0.02, n


@pytest.mark.parametrize("name,billions", [("dalle-2.8b", 2.8), ("dalle-5.6b", 5.6), ("dalle-1.3b", 1.3)])
def test_reference_sizes(name, billions):
    cfg = get_preset(name)
    assert cfg.head_dim == 64
    n = count_on_meta(cfg)
    assert abs(n / 1e9 - billions) / billions <= 0.04, n


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips_yaml(name, tmp_path):
    cfg = get_preset(name)
    assert count_on_meta(cfg) > 0
    path = tmp_path / "c.yaml"
    save_config(cfg, path)
    assert load_config(path) == cfg
    assert load_config(name) == cfg


def test_dvae_paper_matches_openai_layout():
    cfg = get_preset("dvae-paper")
    assert (cfg.image_size, cfg.codebook_size, cfg.n_hid, cfg.n_init, cfg.n_blk_per_group, cfg.group_count) == (
        256,
        8192,
        256,
        128,
        2,
        4,
    )
    assert cfg.grid_size == 32


def test_validation_names_the_field():
    with pytest.raises(ConfigError, match=r"DalleConfig.d_model=100: must be divisible by n_heads=3"):
        DalleConfig(d_model=100, n_heads=3)
    with pytest.raises(ConfigError, match=r"conv_kernel=4"):
        DalleConfig(conv_kernel=4)
    with pytest.raises(ConfigError, match=r"attention_impl='flash'"):
        DalleConfig(attention_impl="flash")
    with pytest.raises(ConfigError, match=r"DVAEConfig.image_size=100: must be divisible by the downsampling factor 8"):
        DVAEConfig(image_size=100)
    with pytest.raises(ConfigError, match=r"n_hid=30"):
        DVAEConfig(n_hid=30)


def test_overrides_and_unknown_keys(tmp_path):
    cfg = DalleConfig.from_name("dalle-tiny", n_layers=6)
    assert cfg.n_layers == 6 and cfg.d_model == get_preset("dalle-tiny").d_model
    with pytest.raises(ConfigError, match=r"unknown DalleConfig key\(s\) \['n_layer'\]"):
        DalleConfig.from_name("dalle-tiny", n_layer=6)
    with pytest.raises(ConfigError, match="unknown preset 'dalle-13b'"):
        load_config("dalle-13b")
    with pytest.raises(ConfigError, match="is a DVAEConfig"):
        DalleConfig.from_name("dvae-tiny")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_type: dalle\nd_model: 64\nn_heads: 4\nwidth: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown DalleConfig key\(s\) \['width'\]"):
        load_config(bad)
    bad.write_text("model_type: gan\n")
    with pytest.raises(ConfigError, match=r"model_type='gan'"):
        load_config(bad)
