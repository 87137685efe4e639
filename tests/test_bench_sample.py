"""The sampling benchmark (dalle_ds/bench/sample.py, scripts/bench_sample.py) at a toy size, in this
process: every mode runs, the old sampler, the full cache and the bounded cache draw the same tokens
for the same seed, and the KV-cache sizes are what each cache keeps."""

import json

from conftest import run_script_main

TOY = ["--layers", "6", "--d-model", "64", "--batch", "2", "--tokens", "20", "--recompute-tokens", "2"]
TOY += ["--text-len", "16", "--grid", "8", "--image-vocab", "128", "--rounds", "1", "--threads", "1"]


def test_toy_run_times_every_mode_and_draws_the_same_tokens_in_every_cached_mode(tmp_path):
    out = tmp_path / "bench.json"
    assert run_script_main("bench_sample.py", *TOY, "--json", out) == 0
    data = json.loads(out.read_text())
    assert data["same_tokens"] == {"full cache": True, "bounded cache": True}
    r = data["rows"]
    assert list(r) == ["old sampler", "full cache", "bounded cache", "recompute"]
    assert [row["tokens"] for row in r.values()] == [20, 20, 20, 2]  # the last 20 codes; 2 recomputed
    for name, row in r.items():  # tokens/s is what the table prints: batch x tokens / seconds
        assert abs(row["tokens_per_s"] - 2 * row["tokens"] / row["seconds"]) < 1e-6 * row["tokens_per_s"], name
    # Caches after the caption's prefill for batch 2 (d_model 64: one head of 64), conv_kernel 11.
    # Full: every layer holds all 80 positions; bounded: text + 9 (row), + 64 (column),
    # + 6 * 8 (conv: 11 // 2 + 1 rows). The schedule of 6 layers: 4 row, 1 column, 1 conv.
    per_position = 2 * 2 * 64 * 4  # k and v, batch 2, 64 dims, fp32
    assert r["full cache"]["cache_bytes"] == r["old sampler"]["cache_bytes"] == 6 * 80 * per_position
    assert r["bounded cache"]["cache_bytes"] == (4 * (16 + 9) + (16 + 64) + (16 + 48)) * per_position
    assert r["recompute"]["cache_bytes"] is None
