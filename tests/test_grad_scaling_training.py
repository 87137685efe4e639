"""Per-resblock gradient scaling in the trainer: switched on from the DeepSpeed JSON, composed with
ZeRO, activation checkpointing, PowerSGD, gradient accumulation and checkpoints (2 ranks)."""

import json
import math

import pytest
import torch
from conftest import ROOT
from launching import STEPS, launch, losses, metrics, resume_copy, shipped_config, train_args

from dalle_ds.distributed.ds_config import prepare_ds_config

CONFIG = "zero2_fp16_resblock_scaling"
SHIPPED_HOOK = json.loads((ROOT / "ds_configs" / "zero2_fp16_powersgd.json").read_text())["communication_hook"]
POWERSGD = {**SHIPPED_HOOK, "start_iter": 2, "min_compression_rate": 1.5, "hierarchical": False}  # flat on 1 node
M = 1  # scale_with_ranks off (the default): the same scales on any number of ranks
GROWTH = 2.0 ** (1 / 1000)


def test_the_section_is_taken_out_before_deepspeed_sees_the_config():
    raw = json.loads((ROOT / "ds_configs" / "zero2_fp16_resblock_scaling.json").read_text())
    cfg = prepare_ds_config(raw, world_size=2, micro_batch_size=2)
    assert "per_resblock_grad_scaling" not in cfg and "fp16" not in cfg and "bf16" not in cfg


def test_the_dvae_trainer_refuses_the_section(tmp_path, single_process_group):
    from dalle_ds.training import DVAERunConfig, DVAETrainer, UsageError, parse_run_config

    cfg = shipped_config(tmp_path, CONFIG)
    args = parse_run_config(
        DVAERunConfig,
        ["--deepspeed_config", str(cfg), "--preset", "dvae-tiny", "--output-dir", str(tmp_path / "o"), "--steps", "1"]
        + ["--micro-batch-size", "2"]
    )
    with pytest.raises(UsageError, match="per_resblock_grad_scaling applies to the transformer"):
        DVAETrainer(args)


def test_bad_values_stop_the_trainer_with_the_key_named(tmp_path, dvae_dir):
    """Through the trainer's command line, on one rank: the error names the key, exit status 2."""
    cfg = shipped_config(tmp_path, CONFIG, per_resblock_grad_scaling={"backoff_cooldown": -1})
    proc = launch("train_dalle.py", *train_args(dvae_dir, tmp_path / "bad", cfg), nprocs=1)
    assert proc.returncode == 2
    assert "per_resblock_grad_scaling.backoff_cooldown=-1" in proc.stderr


def composed(workdir, dvae_dir, out, faults):
    """ZeRO-2 + PowerSGD (compressing from step 2) + activation checkpointing + 2 micro batches per
    step, per-resblock scaling on; an inf loss forced into step 3; a checkpoint after every step."""
    cfg = shipped_config(
        workdir,
        CONFIG,
        communication_hook=POWERSGD,
        activation_checkpointing={},
        zero_optimization={"reduce_scatter": False},
    )
    args = train_args(dvae_dir, out, cfg, "--grad-accum", 2, "--save-every", 1, "--keep-checkpoints", STEPS)
    return [str(a) for a in args], faults


def test_scales_grow_back_off_skip_and_resume_exactly_with_zero2_powersgd_checkpointing_and_accumulation(
    workdir, dvae_dir
):
    args, faults = composed(workdir, dvae_dir, workdir / "resblock_ref", {"overflow_at_step": 3})
    proc = launch("train_dalle.py", *args, "--check-sync", faults=faults)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = metrics(workdir / "resblock_ref")
    assert [r["skipped"] for r in rows] == [False, False, True, False, False, False]
    assert [r["grad_scale_skipped"] for r in rows] == [0, 0, 1, 1, 1, 1]
    assert rows[-1]["skipped_steps"] == 1 and rows[-1]["grad_scale_updates"] == STEPS
    assert all(r["loss_scale"] is None for r in rows)  # DeepSpeed's own scaler is off
    # every block: M * 2^13, x 2^(1/1000) per clean update, / sqrt(2) on the overflow (all blocks saw it)
    expected = [M * 2**13 * GROWTH, M * 2**13 * GROWTH**2, M * 2**13 * GROWTH**2 / math.sqrt(2)]
    expected += [expected[-1] * GROWTH**k for k in (1, 2, 3)]
    for row, want in zip(rows, expected, strict=True):
        for key in ("grad_scale_min", "grad_scale_median", "grad_scale_max"):
            assert row[key] == pytest.approx(want, rel=1e-9), (row["step"], key)
    finite = [r["loss"] for r in rows if r["step"] != 3]
    assert all(math.isfinite(v) for v in finite) and finite[-1] < finite[0]
    assert rows[-1]["comm_bytes"] < 0.5 * rows[-1]["comm_bytes_plain"]  # PowerSGD compressing
    ckpts = workdir / "resblock_ref" / "checkpoints"
    before, after = (
        torch.load(ckpts / f"step0000000{k}" / "mp_rank_00_model_states.pt", weights_only=True) for k in (2, 3)
    )
    assert all(torch.equal(before["module"][k], after["module"][k]) for k in before["module"])  # skipped
    assert after["grad_scaling"]["skipped"] == 1 and after["grad_scaling"]["updates"] == 3

    args, _ = composed(workdir, dvae_dir, workdir / "resblock_resumed", None)
    resume_copy("train_dalle.py", args, workdir / "resblock_ref", faults={"overflow_at_step": 3})
    got = metrics(workdir / "resblock_resumed")
    for key in ("skipped", "grad_scale_min", "grad_scale_max", "grad_scale_skipped"):
        assert [r[key] for r in got] == [r[key] for r in rows], key
    torch.testing.assert_close(
        torch.tensor(losses(workdir / "resblock_resumed")),
        torch.tensor(losses(workdir / "resblock_ref")),
        rtol=1e-6,
        atol=1e-6,
    )


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 3])
def test_resblock_scaling_trains_at_every_zero_stage(stage, workdir, dvae_dir):
    zero = {"stage": stage, "reduce_scatter": stage in (1, 2)} if stage else {"stage": 0}
    cfg = shipped_config(workdir, CONFIG, zero_optimization=zero)
    out = workdir / f"resblock_zero{stage}"
    proc = launch("train_dalle.py", *train_args(dvae_dir, out, cfg, "--check-sync"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = metrics(out)
    assert all(math.isfinite(r["loss"]) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    clean = sum(not r["skipped"] for r in rows)
    assert clean >= STEPS - 2 and rows[-1]["grad_scale_skipped"] == STEPS - clean
    # unflagged blocks grow on every clean update only; a block that overflowed backs off alone
    assert rows[-1]["grad_scale_max"] == pytest.approx(M * 2**13 * GROWTH**clean, rel=1e-9)
    for r in rows:
        if r["skipped"]:
            assert r["grad_scale_min"] < r["grad_scale_max"], r


@pytest.mark.slow
def test_in_fp32_compute_the_scaling_changes_no_loss(workdir, dvae_dir):
    """compute_dtype float32: scaled and unscaled training give the same losses (rounding only)."""
    plain = shipped_config(workdir, "cpu_zero2_fp32")
    scaled = shipped_config(workdir, CONFIG, per_resblock_grad_scaling={"compute_dtype": "float32"})
    runs = {}
    for name, cfg in (("plain", plain), ("scaled", scaled)):
        out = workdir / f"resblock_fp32_{name}"
        proc = launch("train_dalle.py", *train_args(dvae_dir, out, cfg))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        runs[name] = torch.tensor(losses(out))
    torch.testing.assert_close(runs["scaled"], runs["plain"], rtol=1e-4, atol=1e-5)
