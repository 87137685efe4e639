"""Resuming on another number of ranks. A run's step-4 checkpoint is resumed on another number of
ranks by tests/reshard_probe.py, which saves what it loaded at once in the new layout; both
checkpoints, in DeepSpeed's universal form (one folder of fp32 values, Adam moments and step per
parameter), must hold the same numbers exactly. Covered: ZeRO 1, 2 and 3 from 2 ranks to 1 and from
1 to 2, 2 -> 4 once (bf16), fp16 once (its loss scale carried), the dVAE trainer once, PowerSGD
with a streamed data set once, and one loss curve against the uninterrupted run."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from launching import STEPS, assert_resumed, ds_config, launch, losses, metrics, train_args
from shared_runs import stream_powersgd_run, stream_run_args

from dalle_ds.distributed import ds_adapter
from dalle_ds.training.reshard import UNIVERSAL

PROBE = str(ROOT / "tests" / "reshard_probe.py")
TAG = "step00000004"


def dvae_args(out, config, *extra):
    return ["--deepspeed_config", config, "--preset", "dvae-tiny", "--output-dir", out, "--steps", STEPS,
            "--micro-batch-size", 4, "--lr", 1e-3, "--save-every", 2, "--no-progress", *extra]  # fmt: skip


CASES = {  # name: (trainer, ZeRO stage, precision, ranks before, ranks after)
    "zero1_2to1": ("dalle", 1, "fp32", 2, 1),
    "zero1_1to2": ("dalle", 1, "fp32", 1, 2),
    "zero2_2to1": ("dalle", 2, "fp32", 2, 1),
    "zero2_1to2": ("dalle", 2, "fp32", 1, 2),
    "zero3_2to1": ("dalle", 3, "fp32", 2, 1),
    "zero3_1to2": ("dalle", 3, "fp32", 1, 2),
    "zero2_bf16_2to4": ("dalle", 2, "bf16", 2, 4),
    "zero2_fp16_2to1": ("dalle", 2, "fp16", 2, 1),
    "dvae_zero2_2to1": ("dvae", 2, "fp32", 2, 1),
}
_sources: dict[tuple, Path] = {}


def config(workdir: Path, stage: int, precision: str) -> Path:
    path = ds_config(workdir, stage)
    cfg = json.loads(path.read_text())
    if precision != "fp32":  # the fp16 scale starts low: 6 steps leave little time to settle
        cfg[precision] = {"enabled": True, **({"initial_scale_power": 12} if precision == "fp16" else {})}
    out = workdir / f"reshard_stage{stage}_{precision}.json"
    out.write_text(json.dumps(cfg))
    return out


def args(trainer, workdir, dvae_dir, out, stage, precision, *extra):
    cfg = config(workdir, stage, precision)
    return train_args(dvae_dir, out, cfg, *extra) if trainer == "dalle" else dvae_args(out, cfg, *extra)


def source(trainer, stage, precision, ranks, workdir, dvae_dir) -> Path:
    """A finished 6-step run (checkpoints at steps 4 and 6, global batch 2 ranks x micro batch), made
    once per session."""
    key = (trainer, stage, precision, ranks)
    if key not in _sources:
        out = workdir / f"reshard_src_{trainer}_{stage}_{precision}_{ranks}"
        script = "train_dalle.py" if trainer == "dalle" else "train_dvae.py"
        accum = ("--grad-accum", 2) if ranks == 1 else ()  # the global batch 2 ranks make
        proc = launch(script, *args(trainer, workdir, dvae_dir, out, stage, precision, *accum), nprocs=ranks,
                      fp16_on_cpu=precision == "fp16")  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _sources[key] = out
    return _sources[key]


def copy_at_step4(run: Path, dest: Path) -> Path:
    """``run`` as a run killed after step 5 leaves it: the step-4 checkpoint is the latest."""
    shutil.copytree(run, dest, ignore=shutil.ignore_patterns("final", f"step{STEPS:08d}"))
    (dest / "checkpoints" / "latest").write_text(TAG)
    return dest


def universal_state(tag_dir: Path, scratch: Path) -> dict[str, dict[str, torch.Tensor]]:
    """parameter -> {fp32, exp_avg, exp_avg_sq, step} of a checkpoint, via its universal form."""
    folder = tag_dir / UNIVERSAL
    if not folder.is_dir():
        folder = scratch
        ds_adapter.convert_to_universal(tag_dir, folder)
    state = {}
    for param in sorted(p for p in (folder / "zero").iterdir() if p.is_dir()):
        values = {f.stem: torch.load(f, weights_only=True) for f in param.glob("*.pt")}
        state[param.name] = {k: v["param"] if isinstance(v, dict) else v for k, v in values.items()}
    return state


@pytest.mark.parametrize("case", CASES)
def test_resumed_on_another_number_of_ranks_the_state_is_the_checkpoints(case, workdir, dvae_dir, tmp_path):
    trainer, stage, precision, before, after = CASES[case]
    run = copy_at_step4(source(trainer, stage, precision, before, workdir, dvae_dir), tmp_path / "run")
    resaved = tmp_path / "resaved"
    micro = ("--micro-batch-size", 1) if after == 4 else ()  # 4 ranks make the global batch of 4 so
    proc = launch(PROBE, trainer, resaved, *args(trainer, workdir, dvae_dir, run, stage, precision, "--resume", *micro),
                  nprocs=after, fp16_on_cpu=precision == "fp16")  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{TAG} was written by {before} ranks, resumed on {after}" in proc.stdout
    original = universal_state(run / "checkpoints" / TAG, tmp_path / "u_original")
    reloaded = universal_state(resaved / TAG, tmp_path / "u_resaved")
    assert original.keys() == reloaded.keys() and len(original) > 10
    for name, values in original.items():  # ZeRO 1/2 also write each parameter's step, ZeRO-3 does not
        assert values.keys() == reloaded[name].keys() and {"fp32", "exp_avg", "exp_avg_sq"} <= values.keys(), name
        for key, value in values.items():
            assert torch.equal(value, reloaded[name][key]), (name, key)
        assert float(values.get("step", 4)) == 4
    client = json.loads((resaved / TAG / "complete.json").read_text())
    assert client["step"] == 4 and client["world_size"] == after
    assert client["global_batch"] == json.loads((run / "checkpoints" / TAG / "complete.json").read_text())[
        "global_batch"
    ]  # fmt: skip
    if precision == "fp16":  # the dynamic loss scale and its counters carry over
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum

        with torch.serialization.safe_globals([DynamicLossScaler, ZeroStageEnum]):  # the two classes it pickles
            scalers = [torch.load(d / "zero" / "optimizer_state.pt", weights_only=True)["loss_scaler"]
                       for d in (run / "checkpoints" / TAG / UNIVERSAL, tmp_path / "u_resaved")]  # fmt: skip
        assert scalers[0].cur_scale == scalers[1].cur_scale and scalers[0].cur_iter == scalers[1].cur_iter


@pytest.mark.parametrize("stage", [2, 3])
def test_export_from_the_universal_copy_equals_the_checkpoints(stage, workdir, dvae_dir, tmp_path):
    from safetensors.torch import load_file

    from dalle_ds.training.checkpointing import export_checkpoint

    run = copy_at_step4(source("dalle", stage, "fp32", 2, workdir, dvae_dir), tmp_path / "run")
    resume = args("dalle", workdir, dvae_dir, run, stage, "fp32", "--resume")
    proc = launch(PROBE, "dalle", tmp_path / "resaved", *resume, nprocs=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpts = run / "checkpoints"
    a = load_file(export_checkpoint(ckpts, tmp_path / "a", TAG) / "model.safetensors")
    b = load_file(export_checkpoint(ckpts, tmp_path / "b", f"{TAG}/{UNIVERSAL}") / "model.safetensors")
    assert a.keys() == b.keys() and len(a) > 10
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_conversion_is_made_once_verified_and_reused(workdir, dvae_dir, tmp_path):
    """Converted once (a marker of its files' SHA-256s beside), reused while intact, made again when
    damaged; a copy without a marker (made ahead with DeepSpeed's tool) is used as it is."""
    run = copy_at_step4(source("dalle", 2, "fp32", 2, workdir, dvae_dir), tmp_path / "run")
    cfg_args = args("dalle", workdir, dvae_dir, run, 2, "fp32", "--resume")
    universal = run / "checkpoints" / TAG / UNIVERSAL

    def resume(name: str) -> str:
        proc = launch(PROBE, "dalle", tmp_path / name, *cfg_args, nprocs=1)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc.stdout

    assert f"converted {TAG} to {universal}" in resume("a")
    converted = universal / "zero" / "optimizer_state.pt"
    made = converted.stat().st_mtime_ns
    assert f"using {universal}\n" in resume("b") and converted.stat().st_mtime_ns == made
    assert not list((run / "checkpoints" / TAG).glob(".*tmp*"))
    moments = universal / "zero" / "blocks.0.attn.qkv.weight" / "exp_avg.pt"
    data = bytearray(moments.read_bytes())
    data[len(data) // 2] ^= 1
    moments.write_bytes(bytes(data))
    log = resume("c")
    assert f"{moments}: contents differ from the SHA-256 recorded when saved): converting again" in log
    assert converted.stat().st_mtime_ns != made
    (universal / "complete.json").unlink()
    assert f"using {universal} (converted outside dalle-ds, not verified)" in resume("d")


def test_a_global_batch_the_new_ranks_cannot_make_is_refused_with_the_numbers(workdir, dvae_dir, tmp_path):
    run = copy_at_step4(source("dalle", 2, "fp32", 2, workdir, dvae_dir), tmp_path / "run")
    cfg_args = args("dalle", workdir, dvae_dir, run, 2, "fp32", "--resume", "--micro-batch-size", 3)
    proc = launch(PROBE, "dalle", tmp_path / "a", *cfg_args, nprocs=1)
    assert proc.returncode != 0
    assert "its global batch of 4 samples (written by 2 ranks) cannot be made by 1 ranks x micro batch 3" in (
        proc.stdout + proc.stderr
    )


def test_losses_after_the_change_follow_the_uninterrupted_run(workdir, dvae_dir, tmp_path):
    """fp32, synthetic data, BPE dropout 0: every optimizer step sees the same samples whatever the
    number of ranks (the global batch is kept), so only the reduction order differs."""
    cfg = config(workdir, 2, "fp32")
    ref = tmp_path / "ref"
    proc = launch("train_dalle.py", *train_args(dvae_dir, ref, cfg, "--bpe-dropout", 0))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = copy_at_step4(ref, tmp_path / "run")
    proc = launch("train_dalle.py", *train_args(dvae_dir, run, cfg, "--bpe-dropout", 0, "--resume"), nprocs=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_resumed(run)
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(losses(ref)), rtol=1e-4, atol=0)
    assert metrics(run)[-1]["step"] == STEPS


def test_powersgd_and_a_stream_resume_on_one_rank(workdir, dvae_dir, shards, tmp_path):
    """The streamed 2-rank x 2-worker ZeRO-2 + PowerSGD run resumed on 1 rank x 1 worker: the hook's
    residuals start afresh, its schedule carries on (compressing from the first resumed step), the
    stream's position is re-dealt, training goes on."""
    ref = stream_powersgd_run(workdir, dvae_dir, shards)
    run = copy_at_step4(ref, tmp_path / "run")
    argv = stream_run_args(workdir, dvae_dir, shards, run)
    argv[argv.index("--data-workers") + 1] = "1"
    proc = launch("train_dalle.py", *argv, "--resume", nprocs=1)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        f"{TAG} was written by 2 ranks, resumed on 1: global batch 4 kept, gradient accumulation 2; PowerSGD's "
        "residuals and Q's start afresh" in proc.stdout
    )
    assert_resumed(run)
    rows = metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["comm_bytes"] < r["comm_bytes_plain"] for r in rows[4:])  # compressing from step 2 on
    counts = [json.loads((out / "data_counts.json").read_text()) for out in (ref, run)]
    assert counts[0] == counts[1] and counts[0]["samples"] == STEPS * 4  # every sample of the steps, once
