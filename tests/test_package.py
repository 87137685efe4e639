"""Repository-level rules: the layout's layers, model files pure torch, DeepSpeed behind one adapter,
modules small; scripts run; public names exist."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import dalle_ds

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dalle_ds"
MODEL_FILES = sorted((PACKAGE / "models").glob("*.py"))
FORBIDDEN = ("deepspeed", "torch.distributed")
# Each subpackage may import from the ones listed (arrows point one way: no cycles between layers).
LAYERS = {
    "utils": set(),
    "models": {"utils"},
    "data": {"utils", "models", "distributed"},  # the stream ends epochs together over ranks
    "distributed": {"utils"},
    "inference": {"utils", "models", "data"},
    "training": {"utils", "models", "data", "distributed", "inference"},
    # On top, as scripts/ is: the benchmarks' logic and the GPU acceptance check use every layer below;
    # no layer imports them, nor each other, except the GPU check's throughput step, which runs the dry
    # run for its micro batch and compares the measured peak memory with it.
    "bench": {"utils", "models", "data", "distributed", "inference", "training"},
    "checks": {"utils", "models", "data", "distributed", "inference", "training", "planning"},
    # The dry run reads models, configs and the hook's rules; the GPU check may print a plan.
    "planning": {"utils", "models", "data", "distributed", "inference", "training"},
}
MAX_MODULE_LINES = 420
MAX_SCRIPT_LINES = 250  # scripts/*.py parse arguments and print; what they run lives in the package


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
    assert len(MODEL_FILES) >= 5
    for path in MODEL_FILES:
        bad = [m for m in imported_modules(path) if m.startswith(FORBIDDEN)]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: engine code belongs outside the models"


def package_imports(path: Path) -> set[str]:
    """The dalle_ds subpackages a module imports (relative or absolute imports)."""
    rel = path.relative_to(PACKAGE).parts
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                parts = (node.module or "").split(".")
                if parts[0] == "dalle_ds" and len(parts) > 1:
                    out.add(parts[1])
            else:
                base = list(rel[:-1])[: len(rel) - node.level]
                parts = base + ((node.module or "").split(".") if node.module else [a.name for a in node.names])
                if parts:
                    out.add(parts[0])
    return out


def test_layers_import_only_the_layers_below_them():
    seen = set()
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        if len(rel) == 1:
            continue  # dalle_ds/__init__.py re-exports the public names
        layer = rel[0]
        assert layer in LAYERS, f"{path.relative_to(ROOT)}: subpackage {layer!r} is not in the layer table"
        seen.add(layer)
        bad = package_imports(path) - LAYERS[layer] - {layer}
        assert not bad, (
            f"{path.relative_to(ROOT)} imports dalle_ds.{sorted(bad)}: {layer} may use {sorted(LAYERS[layer])}"
        )
    assert seen == set(LAYERS)


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_imports(path: Path, modules: set[str]) -> set[str]:
    """The dalle_ds modules a module imports anywhere in its body (lazy imports inside functions
    included): ``from .x import y`` names ``...x.y`` when that is a module, else ``...x``."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            targets = [f"{root}.{a.name}" if f"{root}.{a.name}" in modules else root for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle of the import graph, each as one closed path (found by depth-first search)."""
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_import_circle_inside_the_package():
    """No module reaches itself through imports, lazy ones inside functions included (the top-level
    ``dalle_ds/__init__.py`` only re-exports and is imported by nothing inside)."""
    paths = [p for p in PACKAGE.rglob("*.py") if p != PACKAGE / "__init__.py"]
    modules = {module_name(p) for p in paths}
    graph = {module_name(p): module_imports(p, modules) for p in paths}
    assert import_cycles(graph) == []


def test_the_circle_check_finds_a_lazy_circle(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .c import thing\n")
    (pkg / "c.py").write_text("from .a import x\n")
    paths = sorted(pkg.glob("*.py"))
    name = lambda p: f"pkg.{p.stem}"  # noqa: E731
    modules = {name(p) for p in paths}
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        graph = {name(p): module_imports(p, modules) for p in paths}
    finally:
        ROOT = saved
    assert import_cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_deepspeed_is_imported_by_the_adapter_only():
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "ds_adapter":
            continue
        bad = [m for m in imported_modules(path) if m.startswith("deepspeed")]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}: DeepSpeed goes through distributed/ds_adapter/"


def test_modules_stay_small():
    big = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not big, f"modules over {MAX_MODULE_LINES} lines (split them by concern): {big}"


def test_scripts_stay_thin():
    big = {
        p.name: n for p in (ROOT / "scripts").glob("*.py") if (n := len(p.read_text().splitlines())) > MAX_SCRIPT_LINES
    }
    assert not big, f"scripts over {MAX_SCRIPT_LINES} lines (move their logic into dalle_ds): {big}"


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


def _dockerfile_settings() -> dict:
    """The Dockerfile's pins and its build stage's DeepSpeed step, read the way a reviewer would."""
    import re

    text = "\n".join(line for line in (ROOT / "Dockerfile").read_text().splitlines() if not line.startswith("#"))
    build_stage = text[: text.index("\nFROM ", text.index(" AS build"))]
    env = dict(re.findall(r"\b(DS_[A-Z_]+)=(\S+)", build_stage))
    return {
        "text": text,
        "torch": re.search(r'ARG TORCH="([^"]+)"', text)[1],
        "deepspeed": re.search(r'ARG DEEPSPEED="([^"]+)"', text)[1],
        "wheel_step": re.search(r"RUN (pip wheel [^\n]+)", build_stage)[1],
        "build_stage": build_stage,
        "ds_env": env,
    }


def test_torch_range_is_the_same_in_setup_env_sh_and_the_dockerfile():
    import re

    docker = _dockerfile_settings()["torch"]
    setup = re.findall(r'"(torch[<>=!~][^"]*)"', (ROOT / "setup.py").read_text())
    env_sh = re.search(r'^torch_spec="([^"]+)"', (ROOT / "scripts" / "env.sh").read_text(), re.M)[1]
    assert setup == [docker] == [env_sh], (setup, docker, env_sh)
    import torch
    from packaging.requirements import Requirement

    assert Requirement(docker).specifier.contains(torch.__version__.split("+")[0]), "the tests run outside the range"


def test_dockerfile_prebuilds_only_the_ops_the_trainers_use():
    """CPUAdam is the one op the trainers load (DeepSpeedCPUAdam for configs that offload optimizer
    states); FusedAdam is never built (the trainers pass torch's AdamW), and ZeRO flattens with
    torch's helpers, not the utils op. The sdist's setup.py imports torch to build ops, so no build
    isolation, and the accelerator is forced to cuda (docker build sees no GPU)."""
    s = _dockerfile_settings()
    assert s["ds_env"] == {"DS_ACCELERATOR": "cuda", "DS_BUILD_OPS": "0", "DS_BUILD_CPU_ADAM": "1"}, s["ds_env"]
    assert "--no-build-isolation" in s["wheel_step"] and '"${DEEPSPEED}"' in s["wheel_step"]
    build = s["build_stage"]
    assert build.index('"${TORCH}"') < build.index("RUN pip wheel"), "torch must be installed before the wheel step"
    assert "installed_ops" in build and "'cpu_adam'" in build, "the build stage asserts the op was prebuilt"
    sources = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    assert "DeepSpeedCPUAdam" in sources and "FusedAdam" not in sources, "the prebuilt ops no longer match the code"
    # The flag names an op of the installed DeepSpeed, as the CUDA accelerator lists them.
    code = (
        "import json; from deepspeed.ops.op_builder.all_ops import ALL_OPS as A; "
        "print(json.dumps({n: o.BUILD_VAR for n, o in A.items()}))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "DS_ACCELERATOR": "cuda"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    build_vars = json.loads(proc.stdout.strip().splitlines()[-1])
    assert build_vars["cpu_adam"] == "DS_BUILD_CPU_ADAM"


def _build_deepspeed_wheel(settings: dict, wheel_dir, extra_env: dict, timeout: int):
    """The build stage's `pip wheel` of DeepSpeed: no build isolation, the Dockerfile's DS_* variables."""
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-cache-dir", "--no-deps", "--no-build-isolation"]
        + ["--wheel-dir", str(wheel_dir), settings["deepspeed"]],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **settings["ds_env"], **extra_env},
    )


def test_dockerfile_lints_and_its_python_install_steps_resolve(tmp_path):
    """No Docker engine here: hadolint the Dockerfile, then do its pip steps in virtualenvs: the
    build stage's DeepSpeed wheel without build isolation (op compilation off: the slow test below
    compiles it), the project's wheel, and what the image installs from them, resolved in a fresh
    virtualenv, so a broken requirement fails CI."""
    proc = subprocess.run([_tool("hadolint"), "Dockerfile"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout
    s = _dockerfile_settings()
    assert f'"{s["deepspeed"]}"' in (ROOT / "setup.py").read_text(), "Dockerfile and setup.py pin different DeepSpeeds"
    wheels = tmp_path / "wheels"
    proc = _build_deepspeed_wheel(s, wheels, {"DS_BUILD_CPU_ADAM": "0"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # An empty virtualenv, resolved into by this environment's (current) pip: `pip --python` targets it.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "fresh")], check=True, timeout=300)
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(tmp_path / "fresh" / "bin" / "python"), "install", "-q"]
        + ["--dry-run", "--ignore-installed", "--report", str(report), s["torch"], *map(str, wheels.glob("*.whl"))],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    install = {
        item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
        for item in json.loads(report.read_text())["install"]
    }
    assert {"dalle-ds", "deepspeed", "torch", "transformers", "datasets", "huggingface-hub"} <= set(install)
    from packaging.requirements import Requirement

    assert Requirement(s["torch"]).specifier.contains(install["torch"].split("+")[0]), install["torch"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_dockerfile_build_stage_compiles_cpu_adam_for_the_cuda_accelerator(tmp_path):
    """The build stage's DeepSpeed step as it is (CPUAdam compiled, ~80 s on 2 cores): the wheel
    records the op as installed for the cuda accelerator, so GPU nodes load it without a JIT build."""
    import zipfile

    s = _dockerfile_settings()
    proc = _build_deepspeed_wheel(s, tmp_path, {"MAX_JOBS": "2"}, timeout=1100)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("deepspeed-*.whl")
    with zipfile.ZipFile(wheel) as z:
        info = z.read("deepspeed/git_version_info_installed.py").decode()
        assert any(n.startswith("deepspeed/ops/adam/cpu_adam_op") and n.endswith(".so") for n in z.namelist())
    assert "accelerator_name='cuda'" in info and "'cpu_adam': 1" in info, info


def test_module_paths_of_earlier_releases_still_import_with_a_warning():
    """Model cards on the hub say `from dalle_ds.hub import from_pretrained`; hostfile scripts run
    `python -m dalle_ds.cluster`."""
    code = (
        "import warnings; warnings.simplefilter('error')\n"
        "try:\n    from dalle_ds.hub import from_pretrained\nexcept DeprecationWarning as w:\n    print(w)\n"
        "warnings.simplefilter('ignore')\n"
        "import dalle_ds.hub, dalle_ds.inference.hub, dalle_ds.config, dalle_ds.models.config\n"
        "assert dalle_ds.hub is dalle_ds.inference.hub and dalle_ds.config is dalle_ds.models.config\n"
        "from dalle_ds.checkpoint import export_checkpoint\n"
        "from dalle_ds.training.checkpointing import export_checkpoint as new\n"
        "assert export_checkpoint is new\n"
    )
    proc = run("-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dalle_ds.hub moved to dalle_ds.inference.hub" in proc.stdout
    cli = run("-m", "dalle_ds.cluster", "--help")
    assert cli.returncode == 0 and "--deepspeed_config" in cli.stdout, cli.stderr[-2000:]
