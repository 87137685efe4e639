"""The fp16 gradient-fidelity benchmark (dalle_ds/bench/grad_scaling, scripts/bench_grad_scaling.py):
its per-res-block statistics on hand-made gradients, the scan's usable ranges, and the script at its
toy size (--quick) in this process, read back from its --json report. Nothing here depends on whether
this CPU has native fp16 (DeepSpeed's check is patched only where it refuses)."""

import json
import math

import pytest
import torch
from conftest import run_script_main

from dalle_ds.bench.grad_scaling.fidelity import SegStat, compare, segment_of
from dalle_ds.bench.grad_scaling.runs import GradScalingSettings
from dalle_ds.bench.grad_scaling.scan import scan_powers, scan_summary
from dalle_ds.bench.grad_scaling.tables import ranges


def test_parameters_fall_into_the_res_blocks_the_scaler_names():
    assert segment_of("blocks.3.ln_1.weight") == segment_of("blocks.3.attn.qkv.weight") == "blocks.3.attn"
    assert segment_of("blocks.3.ln_2.bias") == segment_of("blocks.3.mlp.fc1.weight") == "blocks.3.mlp"
    assert segment_of("text_emb.weight") == segment_of("ln_f.weight") == "rest"


def test_compare_counts_flushed_and_overflowed_entries_per_res_block():
    ref = {"blocks.0.ln_1.weight": torch.tensor([3.0, 4.0]), "blocks.0.attn.w": torch.tensor([1.0, 0.0])}
    ref["blocks.0.mlp.w"] = torch.tensor([2.0, 1.0, 2.0])
    run = {"blocks.0.ln_1.weight": torch.tensor([3.0, 4.0]), "blocks.0.attn.w": torch.tensor([0.0, 0.0])}
    run["blocks.0.mlp.w"] = torch.tensor([math.inf, 1.0, 2.0])
    probe = {"blocks.0.mlp.w": torch.tensor([False, True, False])}  # seen non-finite before a filter zeroed it
    stats = compare(run, ref, probe)
    attn, mlp = stats["blocks.0.attn"], stats["blocks.0.mlp"]
    # attn: reference (3, 4, 1, 0), run (3, 4, 0, 0): the 1 flushed to zero, 1 of 3 nonzero entries.
    assert attn.cos == pytest.approx(25 / (5 * math.sqrt(26)))
    assert attn.flush == pytest.approx(1 / 3) and attn.flush_mass == pytest.approx(1 / math.sqrt(26))
    assert attn.overflow == 0 and attn.norm_ratio == pytest.approx(5 / math.sqrt(26))
    # mlp: the inf and the probed entry count as overflowed (and as zero in the cosine), not as flushed.
    assert mlp.overflow == pytest.approx(2 / 3) and mlp.flush == 0
    assert mlp.cos == pytest.approx(4 / (2 * 3))


def test_the_scan_finds_each_blocks_usable_scales_and_their_intersection():
    good, low = SegStat(1.0, 0, 0, 0, 1), SegStat(0.9, 0.5, 0.1, 0, 0.9)
    over = SegStat(1.0, 0, 0, 0.01, 1)

    def at(k):  # block 0 usable at 2^4..2^12, block 1 at 2^8..2^16; the rest overflows from 2^12
        b0 = good if 4 <= k <= 12 else (low if k < 4 else over)
        b1 = good if 8 <= k <= 16 else (low if k < 8 else over)
        return {"blocks.0.attn": b0, "blocks.0.mlp": b1, "rest": over if k >= 12 else good}

    powers = [0, 4, 8, 12, 16, 20]
    summary = scan_summary({"all-fp16": {k: at(k) for k in powers}, "amp": {k: at(k) for k in powers}})
    assert summary["amp_block_windows"] == {"blocks.0.attn": (4, 12), "blocks.0.mlp": (8, 16)}
    assert summary["amp_windows_intersection"] == (8, 12)
    assert summary["amp_uniform_usable"] == [8, 12]  # blocks only: the rest is fp32 under amp
    assert summary["all_fp16_usable"] == [8]  # one scale for everything: the rest's overflow at 2^12 counts
    assert summary["amp_highest_floor"] == (8, 16) and summary["floor_blocks"] == ["blocks.0.mlp"]
    assert ranges([0, 8, 16, 32]) == "2^0..2^16, 2^32" and ranges([]) == "none"
    assert scan_powers(GradScalingSettings(loss_mult=2.0**-10)) == list(range(6, 47, 3))
    assert scan_powers(GradScalingSettings(scan_powers="0:41:8")) == [0, 8, 16, 24, 32, 40]


def test_quick_run_reports_per_block_fidelity_and_the_scale_scan(tmp_path, single_process_group):
    out = tmp_path / "rows.json"
    assert run_script_main("bench_grad_scaling.py", "--quick", "--json", out) == 0  # tables printed for people
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert set(rows) == {"fp32", "ds-fp16", "resblock"}
    for method in ("ds-fp16", "resblock"):
        r = rows[method]
        assert r["blocks"] == 12 and r["steps"] == 6  # 6 layers x (attn, mlp), all steps ran
        assert r["min_block_cos"] > 0.999, (method, r)  # toy size, loss x 1: both fp16 methods are faithful
        assert r["max_block_overflow"] == 0
        assert 0.9 < r["loss_vs_fp32"] < 1.1
    assert rows["resblock"]["skipped"] == 0
    assert rows["fp32"]["final_loss"] < rows["fp32"]["first_loss"]  # the synthetic task is learnable
    scan = data["scan"]
    assert scan["powers"] == [0, 8, 16, 24, 32, 40]
    assert scan["all_fp16_usable"] and scan["amp_uniform_usable"]
    assert max(scan["powers"]) not in scan["amp_uniform_usable"]  # 2^40 overflows: the scan sees both edges
