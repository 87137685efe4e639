"""scripts/bench_grad_scaling.py at its toy size (--quick): the three runs train, both fp16 methods are
compared with the fp32 reference per res block, the scale scan runs, and the report has its tables.
In a subprocess: the script patches DeepSpeed's fp16 capability check and creates a process group."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_reports_per_block_fidelity_and_the_scale_scan(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_grad_scaling.py"), "--quick", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert "patches that one check" in text  # says that it patched DeepSpeed's fp16 refusal on the CPU
    for heading in ("## Per res block", "## Loss curves", "## Scale scan", "## Summary (paste into README)"):
        assert heading in text, heading
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
    assert scan["all_fp16_usable"] and scan["amp_uniform_usable"]
    assert max(scan["powers"]) not in scan["amp_uniform_usable"]  # 2^40 overflows: the scan sees both edges
