"""The attention benchmark (dalle_ds/bench/attention.py, scripts/bench_attention.py) at a toy size:
what it times computes the same attention as the reference, the ratios and the 64-layer weighting
are the arithmetic the table prints, and the memory child reports in JSON."""

import json

import pytest
import torch
from conftest import run_script_main

from dalle_ds.bench.attention import AttentionShape, inputs, make_fn, quartiles, ratios, schedule_ratios, time_kind

TOY = AttentionShape(text_len=6, grid=4, heads=2, head_dim=8, batch=2, conv_kernel=3)
TOY_ARGS = ["--text-len", "6", "--grid", "4", "--heads", "2", "--head-dim", "8", "--batch", "2", "--conv-kernel", "3"]


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_the_block_path_it_times_equals_dense_attention(kind):
    qkv, _ = inputs(TOY)
    assert qkv.shape == (2, 6 + 16, 3, 2, 8)
    q, k, v = qkv.detach().permute(2, 0, 3, 1, 4)  # (B, H, n, d) each, as SparseAttention splits them
    block, dense = make_fn("block", kind, TOY)(q, k, v), make_fn("dense", kind, TOY)(q, k, v)
    torch.testing.assert_close(block, dense)
    torch.testing.assert_close(make_fn("block_copy", kind, TOY)(q, k, v), dense)  # its memory column's copy path
    assert not torch.allclose(make_fn("causal", kind, TOY)(q, k, v), dense)  # causal sees more than the mask


def test_timings_become_the_ratios_and_the_schedule_weighting_the_table_prints():
    qkv, grad = inputs(TOY)
    times = time_kind("row", TOY, qkv, grad, rounds=3)
    assert {impl: len(ts) for impl, ts in times.items()} == {"block": 3, "dense": 3, "causal": 3}
    r = ratios({"block": [1.0, 2.0, 4.0], "dense": [2.0, 2.0, 2.0], "causal": [3.0, 4.0, 4.0]})
    assert r["median_ms"] == {"block": 2000.0, "dense": 2000.0, "causal": 4000.0}
    assert r["dense_vs_block"][1] == 1.0 and r["causal_vs_block"][1] == 2.0
    assert quartiles([1, 2, 3, 4, 5]) == (1.5, 3, 4.5)
    medians = {"row": {"block": 1, "dense": 2, "causal": 3}, "column": {"block": 2, "dense": 2, "causal": 2}}
    medians["conv"] = {"block": 4, "dense": 8, "causal": 4}
    counts, total = schedule_ratios(medians)
    assert counts == {"row": 47, "column": 16, "conv": 1}  # the paper's 64 layers
    assert total == {"dense": (47 * 2 + 16 * 2 + 8) / (47 + 16 * 2 + 4), "causal": (47 * 3 + 16 * 2 + 4) / 83}


def test_the_script_runs_and_its_memory_child_reports_json(capsys):
    assert run_script_main("bench_attention.py", "--rounds", "3", "--no-memory", *TOY_ARGS) == 0
    capsys.readouterr()
    assert run_script_main("bench_attention.py", "--memory-of", "dense", "--kind", "conv", *TOY_ARGS) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert isinstance(report["peak_extra"], int) and report["peak_extra"] >= 0
