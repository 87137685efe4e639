"""scripts/bench_sample.py at a toy size: every mode runs, the table has its rows and ratios, and the
old sampler, the full cache and the bounded cache draw the same tokens for the same seed."""

import json
import re
import subprocess
import sys

from conftest import ROOT


def test_toy_run_prints_the_table_and_draws_the_same_tokens_in_every_cached_mode(tmp_path):
    out = tmp_path / "bench.json"
    toy = ["--layers", "6", "--d-model", "64", "--batch", "2", "--tokens", "20", "--recompute-tokens", "2"]
    toy += ["--text-len", "16", "--grid", "8", "--image-vocab", "128", "--rounds", "1", "--threads", "1"]
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_sample.py"), *toy, "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "text_len 16 + 8x8 image = 80 positions, 6 layers {'row': 4, 'column': 1, 'conv': 1}" in text
    rows = {}
    for name in ("old sampler", "full cache", "bounded cache", "recompute"):
        m = re.search(rf"^\| {name} \| (\d+) x 2 \| [\d.]+ \| ([\d.]+) \| ([\d.]+)x \| ([\d.]+|-) \|$", text, re.M)
        assert m, (name, text)
        rows[name] = m.groups()
    assert rows["old sampler"][0] == "20" and rows["recompute"][0] == "2" and rows["old sampler"][2] == "1.00"
    assert rows["recompute"][3] == "-"
    assert "same tokens as the old sampler (same seed): full cache True, bounded cache True" in text
    data = json.loads(out.read_text())
    assert data["same_tokens"] == {"full cache": True, "bounded cache": True}
    r = data["rows"]
    for name, row in r.items():  # tokens/s is what the table prints: batch x tokens / seconds
        assert abs(row["tokens_per_s"] - 2 * row["tokens"] / row["seconds"]) < 1e-6 * row["tokens_per_s"], name
    # Caches after the caption's prefill for batch 2 (d_model 64: one head of 64), conv_kernel 11.
    # Full: every layer holds all 80 positions; bounded: text + 9 (row), + 64 (column),
    # + 6 * 8 (conv: 11 // 2 + 1 rows).
    per_position = 2 * 2 * 64 * 4  # k and v, batch 2, 64 dims, fp32
    assert r["full cache"]["cache_bytes"] == r["old sampler"]["cache_bytes"] == 6 * 80 * per_position
    assert r["bounded cache"]["cache_bytes"] == (4 * (16 + 9) + (16 + 64) + (16 + 48)) * per_position
