"""Hostfile checks before a launch: errors name the line; world size against batch sizes."""

import subprocess
import sys

import pytest
from conftest import ROOT

from dalle_ds.distributed.cluster import HostfileError, check_launch, parse_hostfile, select_slots
from dalle_ds.distributed.ds_config import DeepSpeedConfigError


def write(tmp_path, text):
    path = tmp_path / "hosts"
    path.write_text(text)
    return path


def test_parse_and_errors_name_the_line(tmp_path):
    assert parse_hostfile(ROOT / "hostfiles" / "example") == {"worker-0": 8, "worker-1": 8}
    ok = write(tmp_path, "# cluster\n\nnode-a slots=4  # first\nnode-b slots = 2\n")
    assert parse_hostfile(ok) == {"node-a": 4, "node-b": 2}
    cases = {
        "node-a slots=4\nnode-b 4\n": r"hosts:2: 'node-b 4' is not '<hostname> slots=<N>'",
        "node-a slots=4\n\nnode-a slots=2\n": r"hosts:3: host 'node-a' is listed again \(first on line 1\)",
        "node-a slots=0\n": r"hosts:1: host 'node-a' has slots=0; need at least 1",
        "# nothing\n": "no hosts",
    }
    for text, message in cases.items():
        with pytest.raises(HostfileError, match=message):
            parse_hostfile(write(tmp_path, text))
    with pytest.raises(HostfileError, match="does not exist"):
        parse_hostfile(tmp_path / "missing")


def test_include_exclude_follow_deepspeeds_syntax():
    hosts = {"w0": 4, "w1": 4, "w2": 2}
    assert select_slots(hosts, include="w0@w2:1") == {"w0": [0, 1, 2, 3], "w2": [1]}
    assert select_slots(hosts, exclude="w1") == {"w0": [0, 1, 2, 3], "w2": [0, 1]}
    assert select_slots(hosts, exclude="w1:0,3@w2") == {"w0": [0, 1, 2, 3], "w1": [1, 2]}
    with pytest.raises(HostfileError, match="'w9' is not in the hostfile"):
        select_slots(hosts, include="w9")
    with pytest.raises(HostfileError, match=r"w2 has slots 0..1, not \[5\]"):
        select_slots(hosts, include="w2:5")


def test_world_size_is_checked_against_the_batch_sizes(tmp_path):
    hosts = write(tmp_path, "w0 slots=8\nw1 slots=8\n")
    config = tmp_path / "ds.json"
    config.write_text('{"train_batch_size": 256, "train_micro_batch_size_per_gpu": 4}')
    summary = check_launch(hosts, config)
    assert summary["world_size"] == 16 and summary["gradient_accumulation_steps"] == 4
    assert check_launch(hosts, config, exclude="w1")["gradient_accumulation_steps"] == 8
    config.write_text('{"train_batch_size": 100, "train_micro_batch_size_per_gpu": 4}')
    with pytest.raises(DeepSpeedConfigError, match="train_batch_size"):
        check_launch(hosts, config)
    # The trainers' own flags, as launch.sh passes them through.
    config.write_text('{"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto"}')
    summary = check_launch(hosts, config, ["--preset", "x", "--micro-batch-size", "2", "--grad-accum", "3"])
    assert summary["train_batch_size"] == 2 * 3 * 16
    run = tmp_path / "run.yaml"  # or the trainer's run YAML, flags winning over it as in the trainers
    run.write_text("train: {micro_batch_size: 4, grad_accum: 2}\n")
    assert check_launch(hosts, config, ["--config", str(run)])["train_batch_size"] == 4 * 2 * 16
    assert check_launch(hosts, config, ["--config", str(run), "--grad-accum", "1"])["train_batch_size"] == 4 * 16
    proc = subprocess.run(
        [sys.executable, "-m", "dalle_ds.distributed.cluster", str(write(tmp_path, "w0 slots=2\nw0 slots=2\n"))]
        + ["--deepspeed_config", str(config)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "hosts:2: host 'w0' is listed again" in proc.stderr
