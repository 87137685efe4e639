"""The GPU acceptance check (dalle_ds/checks, scripts/gpu_check.py) on a machine without a GPU: the
check list, the no-CUDA exit, the configs and numbers it uses, and --cpu-smoke (each kind of check at a
tiny size on the CPU)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT

from dalle_ds import PRESETS, DalleConfig, get_preset
from dalle_ds.checks import throughput as gc
from dalle_ds.checks.checks import TRAIN_RUNS

SCRIPT = ROOT / "scripts" / "gpu_check.py"
PACKAGE = ROOT / "dalle_ds" / "checks"


def run(*args, env=None, timeout=120):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}  # never the real GPU run
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)  # fmt: skip


def test_list_names_every_check():
    proc = run("--list")
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    trainers = [f"train/{t}/zero{z}_{p}" for t in ("dvae", "dalle") for z in (2, 3) for p in ("fp16", "bf16")]
    assert sorted(names) == sorted([*trainers, "attention/fp32", "attention/bf16", "kvcache/fp32",
                                    "sampling/pipeline", "throughput/dalle-1.3b"])  # fmt: skip
    smoke = [line.split()[0] for line in run("--list", "--cpu-smoke").stdout.splitlines()]
    assert smoke == ["train/dalle/cpu_zero2_fp32", "attention/fp32", "attention/bf16", "kvcache/fp32",
                     "sampling/pipeline", "throughput/dalle-tiny"]  # fmt: skip


def test_without_cuda_it_says_so_and_exits_2(tmp_path):
    proc = run("--out", tmp_path / "report.json")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no CUDA device" in proc.stderr


def test_train_runs_use_shipped_configs_that_match_their_names():
    for trainer, config, preset, dvae in TRAIN_RUNS:
        data = json.loads((ROOT / "ds_configs" / f"{config}.json").read_text())
        stage, precision = config.split("_")
        assert data["zero_optimization"]["stage"] == int(stage.removeprefix("zero")), config
        assert data.get(precision, {}).get("enabled") is True, config
        assert "offload_optimizer" not in data["zero_optimization"], "an offload config would JIT-build CPUAdam"
        assert preset in PRESETS and (trainer == "dalle") == isinstance(get_preset(preset), DalleConfig)
        if dvae is not None:  # the random dVAE must tokenize to the transformer's grid and codebook
            v, d = get_preset(dvae), get_preset(preset)
            assert (v.grid_size, v.codebook_size) == (d.image_grid, d.image_vocab_size), (dvae, preset)


def test_peak_table_and_the_flops_formula():
    assert gc.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gc.peak_bf16_flops("NVIDIA H200") == 989e12
    assert gc.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert gc.peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gc.peak_bf16_flops("NVIDIA L40S") == 362e12 and gc.peak_bf16_flops("NVIDIA L4") == 121e12
    assert gc.peak_bf16_flops("Tesla V100-SXM2-16GB") is None
    config = get_preset("dalle-1.3b")
    flops = gc.model_flops(config, 2)
    assert abs(flops["params"] - 1.285e9) < 0.01e9  # the README's count: a ~1B model
    assert flops["dense"] == 6 * flops["params"] * 2 * 1280
    # Every layer's image queries see all 256 text keys: at least that many pairs per layer.
    assert all(pairs > 1024 * 256 for pairs in flops["pairs"].values())
    assert flops["total"] == flops["dense"] + flops["attention"] and 0 < flops["attention"] < 0.1 * flops["dense"]


def test_cpu_smoke_runs_its_checks_and_writes_the_report(tmp_path):
    out = tmp_path / "report.json"
    proc = run("--cpu-smoke", "--out", out, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["ok"] and report["mode"] == "cpu-smoke" and report["failed"] == 0
    by_name = {c["name"]: c for c in report["checks"]}
    assert set(by_name) == {"train/dalle/cpu_zero2_fp32", "attention/fp32", "attention/bf16", "kvcache/fp32",
                            "sampling/pipeline", "throughput/dalle-tiny"}  # fmt: skip
    assert all(c["status"] == "PASS" for c in by_name.values())
    train = by_name["train/dalle/cpu_zero2_fp32"]["details"]  # through the deepspeed launcher, 1 CPU rank
    assert train["steps"] == 8 and train["complete_checkpoints"] == ["step00000004", "step00000008"]
    assert train["loss_last"] < train["loss_first"] and "final loads" in train["summary"]
    assert all(info["ok"] for info in by_name["attention/bf16"]["details"]["kinds"].values())
    assert all(r["equal"] for r in by_name["kvcache/fp32"]["details"]["runs"])
    assert by_name["throughput/dalle-tiny"]["details"]["mfu"] is None  # no peak for a CPU
    sampling = by_name["sampling/pipeline"]["details"]
    assert sampling["fp32_cond_scale_3_same_tokens"] and sampling["dispatched"]["same_tokens"]
    assert sampling["dispatched"]["blocks_on"] == ["cpu", "disk"] and sampling["bf16_full"]["valid"]
    assert "[PASS] kvcache/fp32" in proc.stdout and "6 passed, 0 failed" in proc.stdout
    # Results and report are written through atomic_path: no temporary file is left behind.
    assert not [p.name for p in tmp_path.rglob("*.tmp")]


def test_the_cli_is_thin_and_its_modules_small():
    assert len(SCRIPT.read_text().splitlines()) <= 30
    big = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not big, f"dalle_ds/checks modules over 400 lines (split them by concern): {big}"


@pytest.mark.parametrize("crash", ["attention/fp32"])
def test_a_crashing_check_fails_alone(tmp_path, crash):
    out = tmp_path / "report.json"
    proc = run("--cpu-smoke", "--only", "attention,kvcache", "--out", out, env={"GPU_CHECK_CRASH": crash})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    status = {c["name"]: c["status"] for c in json.loads(out.read_text())["checks"]}
    assert status == {"attention/fp32": "FAIL", "attention/bf16": "PASS", "kvcache/fp32": "PASS"}
    assert "[FAIL] attention/fp32" in proc.stdout and "without a result" in proc.stdout
