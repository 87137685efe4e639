"""Repository-level rules: model files stay pure torch; scripts run; public names exist."""

import ast
import subprocess
import sys
from pathlib import Path

import dalle_ds

ROOT = Path(__file__).resolve().parents[1]
MODEL_FILES = ["masks.py", "attention.py", "dvae.py", "dalle.py", "config.py"]
FORBIDDEN = ("deepspeed", "torch.distributed")


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_model_files_import_torch_only():
    for name in MODEL_FILES:
        bad = [m for m in imported_modules(ROOT / "dalle_ds" / name) if m.startswith(FORBIDDEN)]
        assert not bad, f"dalle_ds/{name} imports {bad}: engine code belongs outside the models"


def test_import_rule_detects_violations(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import torch\nfrom torch import distributed as dist\nimport deepspeed\n")
    assert {"torch.distributed", "deepspeed"} <= imported_modules(f)


def test_public_contract_names():
    for name in ("attention_mask", "layer_schedule", "load_dvae", "DALLE", "DiscreteVAE", "DalleConfig"):
        assert hasattr(dalle_ds, name), name


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_model_summary_prints_total_on_meta():
    proc = run("scripts/model_summary.py", "--preset", "dalle-12b")
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("total_parameters=")
    assert abs(int(last.split("=")[1]) - 12.0e9) <= 0.02 * 12.0e9
    assert "blocks.*.attn" in proc.stdout


def test_show_masks_writes_pngs(tmp_path):
    from PIL import Image

    proc = run("scripts/show_masks.py", "--text-len", "6", "--grid", "4", "--scale", "3", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    for kind in ("row", "column", "conv"):
        img = Image.open(tmp_path / f"{kind}.png")
        assert img.size == (22 * 3, 22 * 3)
        # Pixel of the worked example: image token 8 (1-based) sees image token 4 in the row mask.
    row = Image.open(tmp_path / "row.png").convert("RGB")
    assert row.getpixel(((6 + 3) * 3 + 1, (6 + 7) * 3 + 1)) == (255, 255, 255)
    assert row.getpixel(((6 + 2) * 3 + 1, (6 + 7) * 3 + 1)) == (0, 0, 0)


def _tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))  # installed into this venv by the [test] extra


def test_shell_scripts_pass_shellcheck():
    scripts = sorted(str(p) for p in (ROOT / "scripts").glob("*.sh"))
    proc = subprocess.run([_tool("shellcheck"), "-x", *scripts], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_dockerfile_lints_and_its_python_install_steps_resolve(tmp_path):
    """No Docker engine here: hadolint the Dockerfile, then do its pip steps in a fresh virtualenv
    (build the wheels as the build stage does, resolve what the runtime stage installs), so a
    broken requirement fails CI."""
    import json
    import re

    proc = subprocess.run([_tool("hadolint"), "Dockerfile"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout
    dockerfile = (ROOT / "Dockerfile").read_text()
    deepspeed = re.search(r'ARG DEEPSPEED="([^"]+)"', dockerfile)[1]
    assert f'"{deepspeed}"' in (ROOT / "setup.py").read_text(), "Dockerfile and setup.py pin different DeepSpeeds"
    wheels = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "fresh")], check=True, timeout=300)
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [str(tmp_path / "fresh" / "bin" / "pip"), "install", "-q", "--dry-run", "--ignore-installed"]
        + ["--report", str(report), *map(str, wheels.glob("*.whl")), deepspeed],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in json.loads(report.read_text())["install"]}
    assert {"dalle-ds", "deepspeed", "torch", "transformers", "datasets", "huggingface-hub"} <= names
