"""The typed run config: flags generated from its fields, YAML, precedence, errors, the reference in
docs/configuration.md, and what a run writes of it."""

import argparse
import json

import pytest
import yaml
from conftest import ROOT

from dalle_ds.distributed.ds_config import DeepSpeedConfigError, load_ds_config, prepare_ds_config
from dalle_ds.training import DalleRunConfig, DVAERunConfig, RunConfigError, dalle_arg_parser, dvae_arg_parser
from dalle_ds.training.config_reference import config_reference
from dalle_ds.training.run_args import changed_settings, parse_run_config

REQUIRED = ["--preset", "dalle-tiny", "--deepspeed_config", "c.json", "--output-dir", "out", "--dvae", "d"]
REQUIRED += ["--steps", "6"]
DVAE_REQUIRED = ["--preset", "dvae-tiny", "--deepspeed_config", "c.json", "--output-dir", "out", "--steps", "6"]


@pytest.mark.parametrize("parser", [dalle_arg_parser, dvae_arg_parser])
def test_every_flag_has_help_text(parser):
    actions = [a for a in parser()._actions if not isinstance(a, argparse._HelpAction)]
    assert len(actions) > 25
    assert not [a.option_strings for a in actions if not a.help], "flags without help"


def test_defaults_are_the_papers_recipes():
    dalle = parse_run_config(DalleRunConfig, REQUIRED)
    o = dalle.optimizer
    assert (o.lr, o.betas, o.eps, o.weight_decay) == (4.5e-4, (0.9, 0.96), 1e-8, 4.5e-2)
    assert (dalle.schedule.warmup_steps, dalle.schedule.lr_end) == (None, None)  # 1/20 of the run; 10% of lr
    assert (dalle.text.bpe_dropout, dalle.text.caption_dropout, dalle.train.seed) == (0.1, 0.0, 0)
    assert (dalle.data.source, dalle.data.workers, dalle.checkpoint.keep, dalle.logging.progress) == (
        "synthetic", 2, 2, True,
    )  # fmt: skip
    dvae = parse_run_config(DVAERunConfig, DVAE_REQUIRED)
    o = dvae.optimizer
    assert (o.lr, o.betas, o.eps, o.weight_decay) == (1e-4, (0.9, 0.999), 1e-8, 1e-4)
    assert (dvae.schedule.warmup_steps, dvae.schedule.lr_end) == (0, 1.25e-6)
    d = dvae.dvae
    assert (d.temperature_start, d.temperature_end, d.kl_weight, d.recon_loss) == (1.0, 1 / 16, 6.6, "logit_laplace")


def test_the_flags_of_earlier_releases_keep_working():
    dalle = parse_run_config(DalleRunConfig, [
        *REQUIRED, "--data", "shards/", "--image-column", "jpg", "--caption-column", "txt", "--data-workers", "0",
        "--shuffle-buffer", "16", "--english-only", "--data-size", "64", "--holdout", "20", "--micro-batch-size", "2",
        "--grad-accum", "3", "--lr", "3e-3", "--seed", "7", "--save-every", "2", "--keep-checkpoints", "3",
        "--export-shard-size", "64KB", "--log-every", "2", "--image-every", "4", "--resume", "--max-bad-steps", "2",
        "--no-progress", "--check-sync", "--local_rank", "1", "--tokenizer", "t.json", "--warmup-steps", "1",
        "--bpe-dropout", "0", "--caption-dropout", "0.5",
    ])  # fmt: skip
    assert dalle.to_dict() == {
        "preset": "dalle-tiny", "deepspeed_config": "c.json", "output_dir": "out", "dvae": "d",
        "data": {"source": "shards/", "image_column": "jpg", "caption_column": "txt", "workers": 0,
                 "shuffle_buffer": 16, "english_only": True, "synthetic_size": 64, "holdout": 20},
        "train": {"steps": 6, "micro_batch_size": 2, "grad_accum": 3, "seed": 7, "max_bad_steps": 2, "compile": False},
        "optimizer": {"lr": 3e-3, "betas": [0.9, 0.96], "eps": 1e-8, "weight_decay": 4.5e-2},
        "schedule": {"warmup_steps": 1, "lr_end": None},
        "checkpoint": {"save_every": 2, "keep": 3, "export_shard_size": "64KB", "resume": True},
        "logging": {"log_every": 2, "image_every": 4, "progress": False, "check_sync": True},
        "text": {"tokenizer": "t.json", "bpe_dropout": 0.0, "caption_dropout": 0.5},
    }  # fmt: skip
    dvae = parse_run_config(DVAERunConfig, [
        *DVAE_REQUIRED, "--lr-end", "1e-6", "--temperature-start", "2", "--temperature-end", "0.5",
        "--temperature-steps", "3", "--kl-weight", "1", "--kl-steps", "2", "--commitment", "0.5",
        "--recon-loss", "mse", "--ema", "--ema-decay", "0.9",
    ])  # fmt: skip
    assert dvae.to_dict()["dvae"] == {
        "temperature_start": 2.0, "temperature_end": 0.5, "temperature_steps": 3, "kl_weight": 1.0, "kl_steps": 2,
        "commitment": 0.5, "recon_loss": "mse", "ema": True, "ema_decay": 0.9,
    }  # fmt: skip
    assert dvae.schedule.lr_end == 1e-6


def test_flag_beats_yaml_beats_default(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({
        "preset": "dalle-tiny", "dvae": "d", "deepspeed_config": "c.json", "output_dir": "out",
        "train": {"steps": 10, "micro_batch_size": 4}, "optimizer": {"lr": 1e-3, "betas": [0.8, 0.9]},
        "data": {"source": "shards/"},
    }))  # fmt: skip
    cfg = parse_run_config(DalleRunConfig, ["--config", str(run), "--lr", "2e-3", "--steps", "12"])
    assert (cfg.optimizer.lr, cfg.train.steps) == (2e-3, 12)  # flags
    assert (cfg.optimizer.betas, cfg.train.micro_batch_size, cfg.data.source) == ((0.8, 0.9), 4, "shards/")  # YAML
    assert (cfg.optimizer.weight_decay, cfg.data.workers) == (4.5e-2, 2)  # defaults
    # A resolved config, written out, reads back as the same config.
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(cfg.to_dict()))
    assert parse_run_config(DalleRunConfig, ["--config", str(again)]) == cfg


def test_bad_settings_are_errors_that_name_the_key_and_the_file(tmp_path):
    def error(values, *argv):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(values))
        with pytest.raises(RunConfigError) as err:
            parse_run_config(DalleRunConfig, ["--config", str(path), *argv])
        return str(err.value)

    base = {"preset": "dalle-tiny", "dvae": "d", "deepspeed_config": "c.json", "output_dir": "o", "train": {"steps": 1}}
    msg = error({**base, "optimizer": {"lrr": 1.0}})
    assert "run.yaml: unknown setting(s) ['optimizer.lrr']" in msg and "'optimizer.lr'" in msg
    assert "run.yaml: train.steps='many': expected int, got str" in error({**base, "train": {"steps": "many"}})
    assert "text.caption_dropout=1.5: must be in [0, 1]" in error({**base, "text": {"caption_dropout": 1.5}})
    assert "checkpoint.export_shard_size: shard size '5 parsecs'" in error(
        {**base, "checkpoint": {"export_shard_size": "5 parsecs"}}
    )
    assert "run.yaml: optimizer: expected a mapping" in error({**base, "optimizer": 3})
    missing = error({"preset": "dalle-tiny", "output_dir": "o"})
    assert "missing required setting(s): --deepspeed_config (deepspeed_config), --dvae (dvae), --steps" in missing
    with pytest.raises(RunConfigError, match="--config nope.yaml: no such file"):
        parse_run_config(DalleRunConfig, ["--config", "nope.yaml"])


def test_a_setting_given_in_the_run_config_and_the_deepspeed_json_names_both():
    raw = load_ds_config(ROOT / "ds_configs" / "cpu_zero2_fp32.json")
    raw["train_micro_batch_size_per_gpu"] = 4
    names = {"train_micro_batch_size_per_gpu": "train.micro_batch_size (--micro-batch-size)"}
    with pytest.raises(DeepSpeedConfigError) as err:
        prepare_ds_config(raw, world_size=2, micro_batch_size=2, source="x.json", given_as=names)
    assert "x.json: train_micro_batch_size_per_gpu=4 conflicts with train.micro_batch_size (--micro-batch-size)=2" in (
        str(err.value)
    )
    raw = load_ds_config(ROOT / "ds_configs" / "cpu_zero2_fp32.json")
    raw["optimizer"] = {"type": "Adam", "params": {"lr": 1e-3}}
    with pytest.raises(DeepSpeedConfigError, match=r"conflict with the run config's optimizer\.\* and schedule\.\*"):
        prepare_ds_config(raw, world_size=2, micro_batch_size=2)


def test_changed_settings_lists_each_difference_by_key():
    before = {"optimizer": {"lr": 1e-3, "eps": 1e-8}, "train": {"steps": 6}, "deepspeed": {"bf16": {"enabled": True}}}
    after = {"optimizer": {"lr": 2e-3, "eps": 1e-8}, "train": {"steps": 6}, "deepspeed": {"bf16": {"enabled": False}}}
    assert changed_settings(before, after) == ["deepspeed.bf16.enabled: True -> False", "optimizer.lr: 0.001 -> 0.002"]
    assert changed_settings(before, before) == []


def test_docs_configuration_holds_the_current_reference():
    """docs/configuration.md's tables are generated (python -m dalle_ds.training.config_reference)."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    assert config_reference() in text
    for flag in ("--lr", "--data-workers", "--keep-checkpoints", "--caption-dropout", "--ema-decay"):
        assert f"`{flag}`" in text


def test_print_config_prints_the_resolved_yaml(capsys):
    with pytest.raises(SystemExit) as stop:
        parse_run_config(DalleRunConfig, [*REQUIRED, "--lr", "1e-3", "--print-config"])
    assert stop.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(parse_run_config(DalleRunConfig, [*REQUIRED, "--lr", "1e-3"]).to_dict()))


def test_a_run_writes_its_configs_and_resume_names_what_changed(tmp_path, dvae_dir, single_process_group):
    """In-process (one rank): run_config.yaml and the prepared ds_config.json land in <output>/ and in
    each checkpoint; a resume with another learning rate and another JSON setting reports both."""
    from launching import shipped_config, train_args

    from dalle_ds.training import DalleTrainer

    out = tmp_path / "run"
    cfg = shipped_config(tmp_path, "cpu_zero2_fp32")
    args = [str(a) for a in train_args(dvae_dir, out, cfg)]
    args[args.index("--steps") + 1] = "2"
    run = parse_run_config(DalleRunConfig, args)
    DalleTrainer(run).run()
    assert parse_run_config(DalleRunConfig, ["--config", str(out / "run_config.yaml")]) == run
    prepared = json.loads((out / "ds_config.json").read_text())
    assert (prepared["train_micro_batch_size_per_gpu"], prepared["train_batch_size"]) == (2, 2)
    ckpt = out / "checkpoints" / "step00000002"
    assert (ckpt / "run_config.yaml").read_text() == (out / "run_config.yaml").read_text()
    assert json.loads((ckpt / "ds_config.json").read_text()) == prepared

    changed = shipped_config(tmp_path, "cpu_zero2_fp32", gradient_clipping=1.0)
    args[args.index("--deepspeed_config") + 1] = str(changed)
    args[args.index("--lr") + 1] = "1e-3"
    resumed = DalleTrainer(parse_run_config(DalleRunConfig, [*args, "--resume"]))
    assert resumed.step == 2
    assert resumed.changed_settings == [
        "deepspeed.gradient_clipping: 4.0 -> 1.0", f"deepspeed_config: {str(cfg)!r} -> {str(changed)!r}",
        "optimizer.lr: 0.003 -> 0.001",
    ]  # fmt: skip
