"""The ZeRO-stage training benchmark's logic (dalle_ds/bench/train.py, scripts/bench_train.py),
without its launcher runs: the configs it trains with, the dVAE it encodes with, the command, and
how a run's metrics become its row."""

import json
from pathlib import Path

from conftest import ROOT

from dalle_ds import get_preset
from dalle_ds.bench.train import compile_seconds, launch_command, matching_dvae_config, metrics_summary, stage_config


def test_each_row_trains_the_cpu_config_at_its_stage():
    base = json.loads((ROOT / "ds_configs" / "cpu_zero2_fp32.json").read_text())
    for stage in range(4):
        for ckpt in (False, True):
            cfg = stage_config(base, stage, ckpt)
            assert cfg["zero_optimization"] == {"stage": stage} and "csv_monitor" not in cfg
            assert ("activation_checkpointing" in cfg) == ckpt
            assert {k: v for k, v in cfg.items() if k not in ("zero_optimization", "activation_checkpointing")} == {
                k: v for k, v in base.items() if k not in ("zero_optimization", "csv_monitor")
            }
    assert base == json.loads((ROOT / "ds_configs" / "cpu_zero2_fp32.json").read_text())  # not modified


def test_the_dvae_tokenizes_to_the_transformers_grid_and_codebook():
    for preset in ("dalle-tiny", "dalle-small"):
        d, v = get_preset(preset), matching_dvae_config(get_preset(preset))
        assert (v.grid_size, v.codebook_size) == (d.image_grid, d.image_vocab_size), preset


def test_the_command_and_the_row_of_a_run(tmp_path):
    args = (Path("train.py"), tmp_path / "z1.json", "dalle-tiny", tmp_path / "dvae", tmp_path / "z1", 6, 4)
    cmd = launch_command(*args)
    assert cmd[2:4] == ["--num_gpus", "2"] and cmd[6] == "train.py"
    value = {flag: cmd[cmd.index(flag) + 1] for flag in ("--deepspeed_config", "--steps", "--micro-batch-size")}
    assert value == {"--deepspeed_config": str(tmp_path / "z1.json"), "--steps": "6", "--micro-batch-size": "4"}
    assert cmd[cmd.index("--preset") + 1] == "dalle-tiny" and cmd[-3:] == ["--no-progress", "--bpe-dropout", "0"]
    rows = [{"tokens_per_s": t, "peak_rss_mb": m} for t, m in [(1, 900), (4, 950), (30, 800), (10, 990), (20, 700)]]
    assert metrics_summary(rows) == (20, 990, 1.25)  # the median after two warm-up steps; the largest peak; 1/1 + 1/4
    assert launch_command(*args, compile=True)[6:] == [*cmd[6:], "--compile"]  # (another master port)
    assert compile_seconds(step_tokens=1000, eager_start=0.002, compiled_start=0.01) == 8  # 10 s against 2 s
