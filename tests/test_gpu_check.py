"""The GPU acceptance check (dalle_ds/checks, scripts/gpu_check.py) on a machine without a GPU: the
check list, the no-CUDA exit, the configs and numbers it uses; the orchestration (a worker process
per check, a crash failing alone, the JSON report) through the CLI; and every kind of check's code
at its --cpu-smoke size, in this process through the package (the train check through the launcher)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from dalle_ds import PRESETS, DalleConfig, get_preset
from dalle_ds.checks import cli
from dalle_ds.checks.checks import TRAIN_RUNS, all_checks
from dalle_ds.checks.context import Ctx
from dalle_ds.checks.throughput import model_flops, peak_bf16_flops
from dalle_ds.checks.worker import run_check

SCRIPT = ROOT / "scripts" / "gpu_check.py"
PACKAGE = ROOT / "dalle_ds" / "checks"
SMOKE = ["train/dalle/cpu_zero2_fp32", "attention/fp32", "attention/bf16", "kvcache/fp32", "sampling/pipeline",
         "throughput/dalle-tiny"]  # fmt: skip


def run(*args, env=None, timeout=120):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}  # never the real GPU run
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)  # fmt: skip


def listed(capsys, *args) -> list[str]:
    assert cli.main(["--list", *args]) == 0
    return [line.split()[0] for line in capsys.readouterr().out.splitlines()]


def test_list_names_every_check(capsys):
    trainers = [f"train/{t}/zero{z}_{p}" for t in ("dvae", "dalle") for z in (2, 3) for p in ("fp16", "bf16")]
    assert sorted(listed(capsys)) == sorted([*trainers, "attention/fp32", "attention/bf16", "kvcache/fp32",
                                             "sampling/pipeline", "throughput/dalle-1.3b"])  # fmt: skip
    assert listed(capsys, "--cpu-smoke") == SMOKE
    assert listed(capsys, "--only", "train/dalle,kvcache") == [t for t in trainers if "dalle" in t] + ["kvcache/fp32"]


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
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA L40S") == 362e12 and peak_bf16_flops("NVIDIA L4") == 121e12
    assert peak_bf16_flops("Tesla V100-SXM2-16GB") is None
    config = get_preset("dalle-1.3b")
    flops = model_flops(config, 2)
    assert abs(flops["params"] - 1.285e9) < 0.01e9  # the README's count: a ~1B model
    assert flops["dense"] == 6 * flops["params"] * 2 * 1280
    # Every layer's image queries see all 256 text keys: at least that many pairs per layer.
    assert all(pairs > 1024 * 256 for pairs in flops["pairs"].values())
    assert flops["total"] == flops["dense"] + flops["attention"] and 0 < flops["attention"] < 0.1 * flops["dense"]


def test_each_check_runs_in_its_own_process_and_a_crash_fails_alone(tmp_path):
    """The CLI's orchestration at --cpu-smoke: the train phase (its worker made to die at start) and
    the attention checks one after the other, fp32 dying too; bf16 runs for real and passes."""
    out = tmp_path / "report.json"
    crash = "train/dalle/cpu_zero2_fp32,attention/fp32"
    proc = run("--cpu-smoke", "--only", "train,attention", "--out", out, env={"GPU_CHECK_CRASH": crash})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["mode"] == "cpu-smoke" and report["environment"]["cuda_available"] is False
    assert (report["complete"], report["ok"], report["passed"], report["failed"]) == (True, False, 1, 2)
    by_name = {c["name"]: c for c in report["checks"]}
    assert list(by_name) == ["train/dalle/cpu_zero2_fp32", "attention/fp32", "attention/bf16"]
    for name in crash.split(","):
        assert by_name[name]["status"] == "FAIL" and "exited 3 without a result" in by_name[name]["error"]
    bf16 = by_name["attention/bf16"]
    assert bf16["status"] == "PASS" and bf16["error"] is None
    assert set(bf16["details"]["kinds"]) == {"row", "column", "conv"}
    assert all(info["ok"] for info in bf16["details"]["kinds"].values())
    assert all(os.path.isfile(c["log"]) for c in report["checks"])
    # Results and report are written through atomic_path: no temporary file is left behind.
    assert not [p.name for p in tmp_path.rglob("*.tmp")]


@pytest.fixture
def smoke(tmp_path, monkeypatch):
    """Run a --cpu-smoke check's worker in this process, as its worker process would: its result."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # launched ranks: never the real GPU
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    threads = torch.get_num_threads()
    # One thread: at these sizes a second one only spin-waits, and on a busy 2-core machine it made the
    # KV-cache check 50x slower (70 s instead of 1.4 s).
    torch.set_num_threads(1)
    checks = {c.name: c for c in all_checks(smoke=True)}

    def run_smoke(name: str) -> dict:
        ctx = Ctx(tmp_path, "cpu", True, tmp_path / "torch_extensions")
        result = run_check(checks[name], ctx)
        assert result["status"] == "PASS", result["error"]
        return result["details"]

    yield run_smoke
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]  # the checks set fp32 strict
    torch.set_float32_matmul_precision(saved[2])
    torch.set_num_threads(threads)


def test_smoke_train_check_runs_the_trainer_under_the_launcher(smoke):
    train = smoke("train/dalle/cpu_zero2_fp32")  # through the deepspeed launcher, 1 CPU rank
    assert train["steps"] == 8 and train["complete_checkpoints"] == ["step00000004", "step00000008"]
    assert train["loss_last"] < train["loss_first"] and train["skipped_steps"] == 0
    assert train["ds_config"] == "ds_configs/cpu_zero2_fp32.json" and train["final"].startswith("pipeline")


def test_smoke_attention_and_kv_cache_checks(smoke):
    attention = smoke("attention/fp32")  # bf16: in the orchestration test
    assert attention["dtype"] == "float32" and attention["sizes"]["grid"] == 4
    assert all(info["ok"] and info["block_vs_dense"]["rel_to_max"] <= 1e-4 for info in attention["kinds"].values())
    kvcache = smoke("kvcache/fp32")
    assert kvcache["preset"] == "dalle-tiny" and len(kvcache["runs"]) == 3
    assert all(r["equal"] for r in kvcache["runs"]) and kvcache["teacher_forced_max_abs_logit_diff"] < 1e-4


def test_smoke_sampling_check(smoke):
    sampling = smoke("sampling/pipeline")
    assert sampling["fp32_cond_scale_1_same_tokens"] and sampling["fp32_cond_scale_3_same_tokens"]
    assert sampling["dispatched"] == {"blocks_on": ["cpu", "disk"], "same_tokens": True}
    assert all(sampling[f"bf16_{mode}"]["valid"] for mode in ("recompute", "full", "bounded"))
    assert sampling["syncs_full"] == {"primed": 0, "whole image": 0}  # no CUDA: nothing to count
    assert sampling["fid_small_extractor"] == sampling["fid_small_extractor"]  # a number, not NaN


def test_smoke_throughput_check(smoke):
    throughput = smoke("throughput/dalle-tiny")
    assert throughput["mfu"] is None and throughput["peak_bf16_flops"] is None  # no peak for a CPU
    config = get_preset("dalle-tiny")
    assert throughput["tokens_per_step"] == throughput["micro_batch"] * config.seq_len
    assert throughput["flops_per_step"] == model_flops(config, throughput["micro_batch"])["total"]
    assert len(throughput["losses"]) == 2


def test_the_cli_is_thin_and_its_modules_small():
    assert len(SCRIPT.read_text().splitlines()) <= 30
    big = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not big, f"dalle_ds/checks modules over 400 lines (split them by concern): {big}"
