"""Mixed precision in both trainers on 2 CPU ranks: bf16 runs for real on this CPU; fp16 runs once
each rank patches DeepSpeed's capability check (tests/launch_env). Every combination trains from a
shipped ``ds_configs/`` file, resumes exactly from its step-4 checkpoint, and exports. The default
run takes a spread of the matrix; ``-m slow`` runs all of it."""

import io
import json
import math

import pytest
import torch
from conftest import ROOT
from launching import STEPS, launch, losses, metrics, resume_copy, shipped_config, train_args

from dalle_ds import DiscreteVAE, get_preset, load_model
from dalle_ds.inference.generation import load_pipeline
from dalle_ds.inference.serialization import load_dvae

# name -> (trainer, shipped config, changes to it)
MATRIX = {
    f"{trainer}-zero{stage}-{precision}": (
        trainer,
        f"zero{2 if (stage, precision) == (1, 'bf16') else stage}_{precision}",
        {"zero_optimization": {"stage": 1}} if (stage, precision) == (1, "bf16") else {},
    )
    for trainer in ("dalle", "dvae")
    for stage in (1, 2, 3)
    for precision in ("fp16", "bf16")
}
MATRIX["dalle-zero3-bf16-offload"] = ("dalle", "zero3_bf16_offload", {})  # DeepSpeedCPUAdam: a 95 s JIT build
for _trainer in ("dalle", "dvae"):  # the other shipped fp16 files, in both trainers
    MATRIX[f"{_trainer}-zero0-fp16"] = (_trainer, "zero0_fp16", {})
    MATRIX[f"{_trainer}-zero2-fp16-powersgd"] = (
        _trainer,
        "zero2_fp16_powersgd",
        {"communication_hook": {"start_iter": 2}},
    )
DEFAULT = {"dalle-zero3-fp16", "dalle-zero1-bf16", "dvae-zero2-fp16", "dvae-zero3-bf16"}
PARAMS = [pytest.param(name, marks=() if name in DEFAULT else pytest.mark.slow) for name in MATRIX]


def dvae_args(out, config, *extra):
    return [
        "--deepspeed_config", config, "--preset", "dvae-tiny", "--output-dir", out, "--steps", STEPS,
        "--micro-batch-size", 4, "--lr", 1e-3, "--save-every", 2, "--no-progress", *extra,
    ]  # fmt: skip


def args_for(name, workdir, dvae_dir, out, *extra):
    trainer, config, changes = MATRIX[name]
    if "fp16" in config:  # start the dynamic scale lower than the shipped 2^16: 6 steps leave little time to settle
        changes = {**changes, "fp16": {"initial_scale_power": 12}}
    cfg = shipped_config(workdir, config, **changes)
    if trainer == "dalle":
        return "train_dalle.py", train_args(dvae_dir, out, cfg, *extra)
    return "train_dvae.py", dvae_args(out, cfg, *extra)


_runs: dict[str, object] = {}


def overflow(name):
    """fp16 runs overflow in step 5 (an inf loss): resumed from step 4, the first step of the resumed
    run is a skipped one, the case DeepSpeed 0.19's ZeRO-3 gets wrong (ds_adapter.after_skipped_step)."""
    return {"overflow_at_step": 5} if "fp16" in name else {}


def reference_run(name, workdir, dvae_dir):
    if name not in _runs:
        out = workdir / f"prec_{name}"
        script, args = args_for(name, workdir, dvae_dir, out, "--check-sync")
        proc = launch(script, *args, fp16_on_cpu="fp16" in name, faults=overflow(name))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _runs[name] = out
    return _runs[name]


@pytest.mark.parametrize("name", PARAMS)
def test_precision_trains_resumes_exactly_and_exports(name, workdir, dvae_dir):
    out = reference_run(name, workdir, dvae_dir)
    rows = metrics(out)
    values = [r["loss"] for r in rows if r["step"] != 5 or not overflow(name)]
    assert len(rows) == STEPS and all(math.isfinite(v) for v in values), values
    applied = [r["loss"] for r in rows if not r["skipped"]]
    assert len(applied) >= 3, rows  # fp16 may skip its first steps while the loss scale settles
    assert sum(values[-2:]) / 2 < values[0] - 0.05, values
    if "fp16" in name:
        assert all(r["loss_scale"] >= 1 for r in rows) and rows[4]["skipped"]
        assert rows[-1]["skipped_steps"] == sum(r["skipped"] for r in rows)
    else:
        assert all(r["loss_scale"] is None and not r["skipped"] for r in rows)
    hashes = {(out / f"param_sha256_rank{r}.txt").read_text() for r in range(2)}
    assert len(hashes) == 1, "ranks diverged"
    if name.startswith("dalle"):
        model, tokenizer = load_pipeline(out / "final")
        assert tokenizer.get_vocab_size() > 0
    else:
        model = load_model(out / "final")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())

    resumed = workdir / f"prec_{name}_resumed"
    script, args = args_for(name, workdir, dvae_dir, resumed)
    resume_copy(script, [str(a) for a in args], out, fp16_on_cpu="fp16" in name, faults=overflow(name))
    got = metrics(resumed)
    assert [r["skipped"] for r in got] == [r["skipped"] for r in rows]
    assert [r["loss_scale"] for r in got] == [r["loss_scale"] for r in rows]
    torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(out)), rtol=1e-6, atol=1e-6)


# --- the frozen dVAE of the DALL-E trainer -------------------------------------------------------


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_dalle_trainer_encodes_images_in_fp32_whatever_the_engine_dtype(
    precision, single_process_group, fp16_on_cpu, tmp_path, dvae_dir
):
    from dalle_ds.training import DalleRunConfig, DalleTrainer, parse_run_config

    cfg = shipped_config(tmp_path, f"zero2_{precision}")
    args = parse_run_config(DalleRunConfig, [str(a) for a in train_args(dvae_dir, tmp_path / "out", cfg)])
    trainer = DalleTrainer(args)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    assert {p.dtype for p in trainer.engine.module.parameters()} == {dtype}
    assert {p.dtype for p in trainer.dvae.parameters()} == {torch.float32}
    assert not any(name.startswith("dvae.") for name, _ in trainer.engine.module.named_parameters())
    batch = trainer.batch(0)
    trainer.micro_step = 0
    codes = trainer.encode_images(batch["image"])
    reference = load_dvae(dvae_dir).encode(batch["image"])  # a plain fp32 dVAE
    assert torch.equal(codes, reference)
    loss, row, _ = trainer.compute_loss(batch)
    assert loss.dtype == torch.float32 and math.isfinite(row["loss"])


def test_dvae_in_16_bits_keeps_losses_and_codebook_in_fp32():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 36, 36)
    for preset in ("dvae-tiny", "dvae-demo"):  # gumbel and vq
        model = DiscreteVAE(get_preset(preset))
        if model.quantizer is not None:
            model.train()(torch.nn.functional.interpolate(images, size=model.config.image_size))
        ref = model.eval()(torch.nn.functional.interpolate(images, size=model.config.image_size))
        model.bfloat16()
        assert model.encoder.blocks.input.weight.dtype == torch.bfloat16
        if model.quantizer is not None:  # a 16-bit EMA would round its updates away
            assert {b.dtype for b in model.quantizer.buffers() if b.is_floating_point()} == {torch.float32}
        out = model(torch.nn.functional.interpolate(images, size=model.config.image_size))  # fp32 in
        assert out.loss.dtype == torch.float32 and out.recon_nll.dtype == torch.float32
        torch.testing.assert_close(out.loss, ref.loss, rtol=0.05, atol=0.05)
        out.loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in model.encoder.parameters())


# --- fp16 loss scaling inside the trainer ----------------------------------------------------------


def _optimizer_state(path):
    """A ZeRO-2 optimizer shard, unpickled with only the three DeepSpeed classes it holds allowed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([DynamicLossScaler, ZeroStageEnum, fragment_address]):
        state = torch.load(path, map_location="cpu", weights_only=True)["optimizer_state_dict"]
    return state["single_partition_of_fp32_groups"], state["base_optimizer_state"]["state"]


POWERSGD = json.loads((ROOT / "ds_configs" / "zero2_fp16_powersgd.json").read_text())["communication_hook"]


_fp16_runs: dict[int, object] = {}


def powersgd_fp16_run(stage, workdir, dvae_dir):
    """The paper's setting (rank 4, Q drawn once, Householder, 16-bit P/Q) at ZeRO ``stage``, flat
    (hierarchical mode on one node averages exactly), compressing from step 2, the loss scale
    starting at 2^10 (hysteresis 1), an inf loss forced into step 4 (ZeRO-2: a checkpoint after every step)."""
    if stage not in _fp16_runs:
        hook = {"start_iter": 2, "min_compression_rate": 1.5, "hierarchical": False}
        changes = {"fp16": {"initial_scale_power": 10, "hysteresis": 1}}
        if stage == 2:  # the shipped file itself
            cfg = shipped_config(workdir, "zero2_fp16_powersgd", communication_hook=hook, **changes)
        else:  # its hook section on the shipped ZeRO 0 / 1 fp16 files
            if stage == 1:
                changes["zero_optimization"] = {"reduce_scatter": False}
            cfg = shipped_config(workdir, f"zero{stage}_fp16", communication_hook={**POWERSGD, **hook}, **changes)
        out = workdir / f"psgd_fp16_zero{stage}"
        extra = ("--check-sync", *(("--save-every", 1, "--keep-checkpoints", STEPS) if stage == 2 else ()))
        proc = launch("train_dalle.py", *train_args(dvae_dir, out, cfg, *extra), fp16_on_cpu=True,
                      faults={"overflow_at_step": 4})  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _fp16_runs[stage] = out
    return _fp16_runs[stage]


@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow), 2])
def test_powersgd_under_fp16_skips_an_overflowed_step_and_keeps_training(stage, workdir, dvae_dir):
    """An overflow after start_iter is a skipped step (the scale halves), not an exception."""
    out = powersgd_fp16_run(stage, workdir, dvae_dir)
    rows = metrics(out)
    assert [r["skipped"] for r in rows] == [False, False, False, True, False, False]
    assert rows[3]["loss_scale"] == rows[2]["loss_scale"] / 2 == 512
    assert rows[-1]["skipped_steps"] == 1
    assert rows[-1]["comm_bytes"] < 0.2 * rows[-1]["comm_bytes_plain"]  # compressing after start_iter
    values = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in values) and values[-1] < values[0] - 0.3, values
    hashes = {(out / f"param_sha256_rank{r}.txt").read_text() for r in range(2)}
    assert len(hashes) == 1, "ranks diverged"


def test_fp16_overflow_leaves_weights_and_adam_moments_untouched(workdir, dvae_dir):
    """DeepSpeed's promise, with the hook's residuals staged: the skipped batch (step 4) changes no
    fp32 master weight, no Adam moment and no module weight; the next step applies (ZeRO-2 files)."""
    ckpts = powersgd_fp16_run(2, workdir, dvae_dir) / "checkpoints"
    for rank in range(2):
        name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
        (w3, s3), (w4, s4), (w5, _) = (_optimizer_state(ckpts / f"step0000000{k}" / name) for k in (3, 4, 5))
        assert all(torch.equal(a, b) for a, b in zip(w3, w4, strict=True))
        assert s3.keys() == s4.keys() and len(s3) > 0
        for key in s3:
            assert all(torch.equal(s3[key][k], s4[key][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
        assert not all(torch.equal(a, b) for a, b in zip(w4, w5, strict=True))  # the next step applies
    modules = [torch.load(ckpts / f"step0000000{k}" / "mp_rank_00_model_states.pt", weights_only=True) for k in (3, 4)]
    assert all(torch.equal(modules[0]["module"][k], modules[1]["module"][k]) for k in modules[0]["module"])


def test_rng_state_round_trip_covers_every_generator_a_step_draws_from():
    import random

    import numpy as np

    from dalle_ds.training.checkpointing import capture_rng_state, restore_rng_state

    state = capture_rng_state()
    saved = torch.load(io.BytesIO(_save(state)), weights_only=True)  # as checkpoints store it
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(saved)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]


def _save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()
