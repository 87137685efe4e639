"""The GPU acceptance check (dalle_ds/checks, scripts/gpu_check.py) on a machine without a GPU: the
check list, the no-CUDA exit, the configs and numbers it uses; the orchestration (a worker process
per check, a crash failing alone, the JSON report) through the CLI; and every kind of check's code
at its --cpu-smoke size, in this process through the package (the train check through the launcher)."""

import contextlib
import dataclasses
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
from dalle_ds.checks.flops import PEAK_BF16, model_flops, peak_bf16_flops
from dalle_ds.checks.worker import run_check
from dalle_ds.planning.layout import Layout
from dalle_ds.planning.plan import plan_run

SCRIPT = ROOT / "scripts" / "gpu_check.py"
PACKAGE = ROOT / "dalle_ds" / "checks"
SMOKE = ["train/dalle/cpu_zero2_fp32", "attention/fp32", "attention/bf16", "speed/attention-flex", "kvcache/fp32",
         "sampling/pipeline", "throughput/dalle-tiny"]  # fmt: skip


def run(*args, env=None, timeout=120):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}  # never the real GPU run
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)  # fmt: skip


def listed(capsys, *args) -> list[str]:
    assert cli.main(["--list", *args]) == 0
    return [line.split()[0] for line in capsys.readouterr().out.splitlines()]


def test_list_names_every_check(capsys):
    trainers = [f"train/{t}/zero{z}_{p}" for t in ("dvae", "dalle") for z in (2, 3) for p in ("fp16", "bf16")]
    throughput = ["throughput/dalle-1.3b", "throughput/dalle-1.3b/dense", "throughput/dalle-1.3b/flex",
                  "throughput/dalle-1.3b/flex+compile"]  # fmt: skip
    assert sorted(listed(capsys)) == sorted([*trainers, "attention/fp32", "attention/bf16", "speed/attention-flex",
                                             "kvcache/fp32", "sampling/pipeline", *throughput])  # fmt: skip
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


def test_peak_table_names_a_source_for_every_entry():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA L40S") == 362e12 and peak_bf16_flops("NVIDIA L4") == 121e12
    assert peak_bf16_flops("Tesla V100-SXM2-16GB") is None
    for pattern, peak, source in PEAK_BF16:
        assert 1e14 < peak < 1e16, pattern
        # A vendor document, and the figure it prints: the dense peak, or the sparse one that is twice it.
        assert source.startswith("NVIDIA ") and ("datasheet" in source or "product brief" in source), pattern
        assert "BF16" in source and ("sparsity" in source or "sparse" in source), pattern


def test_flops_formula_parts_for_the_1_3b_model():
    c = get_preset("dalle-1.3b")
    flops = model_flops(c, 2)
    assert abs(flops["params"] - 1.285e9) < 0.01e9  # the README's count: a ~1B model
    # What is not a matmul weight: position, row and column embeddings, biases and layer norms.
    d = c.d_model
    per_layer = (3 * d + d + 4 * d + d) + 2 * 2 * d  # qkv, proj, fc, proj biases; two norms
    positions = (c.text_len + 2 * c.image_grid) * d
    assert flops["params"] - flops["matmul_params"] == positions + c.n_layers * per_layer + 2 * d
    # The heads read only the positions that predict: less than 6 * (matmul params) * every token.
    every_token = 6 * flops["matmul_params"] * 2 * c.seq_len
    assert 0.9 * every_token < flops["matmul"] < every_token
    # Every layer's image queries see all 256 text keys: at least that many pairs per layer.
    assert all(pairs > 1024 * 256 for pairs in flops["pairs"].values())
    assert flops["total"] == flops["matmul"] + flops["attention"] and 0 < flops["attention"] < 0.1 * flops["matmul"]


@pytest.mark.parametrize("math_sdpa", [False, True])
def test_flops_formula_against_torch_flop_counter(math_sdpa):
    """torch's FlopCounterMode over one forward + backward of dalle-tiny with dense attention counts
    every matrix multiply. Its CPU SDPA kernel is not counted (attention adds nothing), its math
    kernel is: two (n x n) bmm's forward, four backward per layer, whatever the mask, i.e.
    12 * d * B * n**2 per layer against the formula's 12 * d * B * allowed pairs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from dalle_ds import DALLE

    c = dataclasses.replace(get_preset("dalle-tiny"), attention_impl="dense")
    B, n, d = 3, c.seq_len, c.d_model
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, c.text_vocab_size, (B, c.text_len), generator=g)
    codes = torch.randint(0, c.image_vocab_size, (B, c.image_len), generator=g)
    torch.manual_seed(0)
    model = DALLE(c)
    with sdpa_kernel(SDPBackend.MATH) if math_sdpa else contextlib.nullcontext(), FlopCounterMode(display=False) as fc:
        model(text, image_codes=codes).loss.backward()
    flops = model_flops(c, B)
    dense_attention = 12 * d * B * c.n_layers * n * n if math_sdpa else 0
    assert fc.get_total_flops() == flops["matmul"] + dense_attention
    # The allowed pairs, counted from the masks' definitions (docs/design.md, "Attention masks").
    T, W, N = c.text_len, c.image_grid, c.image_len
    causal_text = T * (T + 1) // 2
    assert flops["pairs"]["row"] == causal_text + sum(T + min(p, W) + 1 for p in range(N))
    assert flops["pairs"]["column"] == causal_text + sum(T + p // W + 1 for p in range(N))
    h = c.conv_kernel // 2  # rows r - h .. r - 1 over columns c - h .. c + h, own row c - h .. c; clipped
    conv = sum(T + min(r, h) * (min(W - 1, col + h) - max(0, col - h) + 1) + col - max(0, col - h) + 1
               for r in range(W) for col in range(W))  # fmt: skip
    assert flops["pairs"]["conv"] == causal_text + conv


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


@pytest.mark.slow  # 10 s; the orchestration test runs the train phase by default (its worker made to crash)
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


def test_smoke_attention_speed_check_times_every_path_and_checks_their_values(smoke):
    speed = smoke("speed/attention-flex")
    impls = ["dense", "causal", "block", "flex", "flex_eager"]
    assert speed["dtype"] == "float32" and speed["backward"] is False  # no FlexAttention backward on the CPU
    for info in speed["kinds"].values():
        assert list(info["median_ms"]) == impls and all(ms > 0 for ms in info["median_ms"].values())
        assert set(info["error"]) == {"dense", "block", "flex", "flex_eager"}
        assert all(e["rel_to_max"] <= info["tol"] == 1e-4 for e in info["error"].values())
        assert info["error"]["block"]["grads"] and not info["error"]["flex"]["grads"]
    # The mix: each kind's median weighted by the paper's 47 row, 16 column and 1 conv layers.
    medians = {kind: info["median_ms"] for kind, info in speed["kinds"].items()}
    total = {i: sum(n * medians[k][i] for k, n in (("row", 47), ("column", 16), ("conv", 1))) for i in impls}
    assert speed["mix_speed_vs_causal"] == {i: round(total["causal"] / total[i], 3) for i in impls}
    assert speed["fastest_sparse"] in ("block", "flex", "flex_eager") and "goal 1.8x" in speed["summary"]


def test_the_speed_check_fails_on_values_not_on_speed(smoke, monkeypatch):
    import dalle_ds.checks.attention_speed as attention_speed

    fn = attention_speed._fn
    monkeypatch.setattr(attention_speed, "_fn", lambda impl, kind, s: (
        (lambda q, k, v: 1.01 * fn(impl, kind, s)(q, k, v)) if impl == "block" and kind == "conv" else fn(impl, kind, s)
    ))  # fmt: skip
    with pytest.raises(AssertionError, match=r"outside tolerance: \['conv/block'\]"):
        smoke("speed/attention-flex")


def test_smoke_sampling_check(smoke):
    sampling = smoke("sampling/pipeline")
    assert sampling["fp32_cond_scale_1_same_tokens"] and sampling["fp32_cond_scale_3_same_tokens"]
    assert sampling["dispatched"] == {"blocks_on": ["cpu", "disk"], "same_tokens": True}
    assert all(sampling[f"bf16_{mode}"]["valid"] for mode in ("recompute", "full", "bounded"))
    assert sampling["syncs_full"] == {"primed": 0, "whole image": 0}  # no CUDA: nothing to count
    assert sampling["fid_small_extractor"] == sampling["fid_small_extractor"]  # a number, not NaN


def test_smoke_throughput_check_runs_the_trainer(smoke, single_process_group):
    throughput = smoke("throughput/dalle-tiny")  # DalleTrainer in this process, on the session's group
    assert throughput["mfu"] is None and throughput["peak_bf16_flops"] is None  # no peak for a CPU
    assert throughput["ds_config"] == "ds_configs/cpu_zero2_fp32.json" and throughput["zero_stage"] == 2
    config, micro = get_preset("dalle-tiny"), throughput["micro_batch"]
    assert throughput["tokens_per_step"] == micro * config.seq_len and throughput["tokens_per_s"] > 0
    flops = model_flops(config, micro)
    assert throughput["flops_matmul_per_step"] == flops["matmul"] > 0
    assert throughput["flops_attention_per_step"] == flops["attention"] > 0
    assert throughput["flops_per_step"] == flops["matmul"] + flops["attention"]
    achieved = flops["total"] / (throughput["step_ms"] / 1e3) / 1e12
    assert throughput["achieved_tflops"] == pytest.approx(achieved, abs=1e-3)  # both rounded in the report
    # The trainer's own records: one after the warm-up interval, then the timed ones, which alone give
    # the reported step time.
    rows = [json.loads(line) for line in open(throughput["metrics"])]
    assert [r["step"] for r in rows] == [2, 4, 6] and len(throughput["losses"]) == 3
    step_s = [throughput["tokens_per_step"] / r["tokens_per_s"] for r in rows[1:]]
    assert throughput["step_ms"] == pytest.approx(1e3 * sum(step_s) / 2, abs=0.01) and throughput["timed_steps"] == 4
    # The dry run of the same run (config, micro batch, frozen dVAE) is reported; no GPU, no measured peak.
    plan = plan_run(config, json.loads((ROOT / throughput["ds_config"]).read_text()), Layout(1, 1, 2**34, micro, 1),
                    dvae=get_preset("dvae-tiny"), device_type="cpu")  # fmt: skip
    assert throughput["predicted_total_bytes"] == plan.total_bytes > 0
    assert throughput["predicted_components"] == plan.components
    assert throughput["peak_memory_bytes"] is None and throughput["memory_measured_over_predicted"] is None


def test_the_cli_is_thin_and_its_modules_small():
    assert len(SCRIPT.read_text().splitlines()) <= 30
    big = {p.name: n for p in PACKAGE.glob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert not big, f"dalle_ds/checks modules over 400 lines (split them by concern): {big}"
