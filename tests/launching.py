"""Helpers for tests that train on several ranks (2 CPU processes, gloo): started as the `deepspeed`
launcher starts them, or through the launcher itself where its behaviour is under test."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from conftest import ROOT, free_port

from dalle_ds.distributed.launcher import deepspeed_command
from dalle_ds.training.faults import ENV as FAULTS_ENV

STEPS = 6
LAUNCH_ENV = ROOT / "tests" / "launch_env"  # sitecustomize: fp16 on CPU, collective recording


def deepspeed_cmd(script: str, *args, nprocs: int = 2) -> list[str]:
    return deepspeed_command(ROOT / "scripts" / script, *args, num_gpus=nprocs)


def shm_segments() -> set[str]:
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_*")} if shm.is_dir() else set()


def _env(fp16_on_cpu=False, record=None, faults=None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop(FAULTS_ENV, None)
    if faults:
        env[FAULTS_ENV] = json.dumps(faults)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(LAUNCH_ENV), env.get("PYTHONPATH")]))
    if fp16_on_cpu:
        env["DALLE_DS_TEST_FP16_ON_CPU"] = "1"
    if record is not None:
        Path(record).mkdir(parents=True, exist_ok=True)
        env["DALLE_DS_TEST_RECORD_COLLECTIVES"] = str(record)
    return env


def spawn_ranks(cmd: list[str], nprocs: int, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Start ``nprocs`` ranks of ``cmd`` on this machine the way ``deepspeed.launcher.launch`` does
    (its environment variables, ``--local_rank=i`` after the script) without the launcher's own two
    Python processes, which cost ~5 s per run on 2 cores. Like the launcher, when a rank fails the
    others are stopped. stdout/stderr hold every rank's output in rank order."""
    port = str(free_port())
    logs, procs = [], []
    for rank in range(nprocs):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs),
                    "LOCAL_SIZE": str(nprocs), "CROSS_RANK": "0", "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port}  # fmt: skip
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
        logs.append((out, err))
        procs.append(subprocess.Popen([*cmd[:1], "-u", cmd[1], f"--local_rank={rank}", *cmd[2:]], stdout=out,
                                      stderr=err, cwd=ROOT, env=rank_env))  # fmt: skip
    deadline = time.monotonic() + timeout
    code = 0
    try:
        while any(p.poll() is None for p in procs):
            failed = [p.returncode for p in procs if p.returncode not in (None, 0)]
            if failed:  # a dead rank leaves the others waiting in a collective: stop them, as the launcher does
                code = failed[0]
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(cmd, timeout)
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    code = code or next((p.returncode for p in procs if p.returncode), 0)
    texts = []
    for out, err in logs:
        out.seek(0), err.seek(0)
        texts.append((out.read(), err.read()))
        out.close(), err.close()
    return subprocess.CompletedProcess(cmd, code, "".join(t[0] for t in texts), "".join(t[1] for t in texts))


def launch(script, *args, nprocs=2, timeout=300, fp16_on_cpu=False, record=None, faults=None, launcher=False):
    """Run ``scripts/<script>`` on ``nprocs`` ranks: started as the deepspeed launcher starts them
    (:func:`spawn_ranks`), or, with ``launcher=True``, through the real ``deepspeed`` launcher (for
    tests of what the launcher itself does). ``fp16_on_cpu``: patch DeepSpeed's fp16 capability check
    in every rank (the arithmetic runs on this CPU); ``record``: a folder that receives each rank's
    torch.distributed calls made from dalle_ds (tests/launch_env/collective_recorder.py); ``faults``:
    what the trainer's test-only fault seam injects (``dalle_ds/training/faults.py``), e.g.
    ``{"kill_after_step": 5}``."""
    env = _env(fp16_on_cpu, record, faults)
    before = shm_segments()
    if launcher:
        proc = subprocess.run(
            deepspeed_cmd(script, *args, nprocs=nprocs), capture_output=True, text=True, timeout=timeout, cwd=ROOT,
            env=env,
        )  # fmt: skip
    else:
        proc = spawn_ranks([sys.executable, str(ROOT / "scripts" / script), *map(str, args)], nprocs, env, timeout)
    # DeepSpeed's CPU shm all-reduce op never unlinks its segments; init_distributed skips it.
    leaked = shm_segments() - before
    assert not leaked, f"/dev/shm segments left behind by the run: {sorted(leaked)}"
    return proc


def ds_config(tmp: Path, stage: int, **extra) -> Path:
    base = json.loads((ROOT / "ds_configs" / "cpu_zero2_fp32.json").read_text())
    base["zero_optimization"] = {"stage": stage, **({"reduce_scatter": True} if stage in (1, 2) else {}), **extra}
    base.pop("csv_monitor", None)
    path = tmp / f"ds_stage{stage}{'_offload' if extra else ''}.json"
    path.write_text(json.dumps(base))
    return path


def shipped_config(tmp: Path, name: str, **changes) -> Path:
    """``ds_configs/<name>.json`` as shipped, with top-level sections updated by ``changes`` (a dict
    value is merged into the section) and the CSV monitor off; written under ``tmp``."""
    cfg = json.loads((ROOT / "ds_configs" / f"{name}.json").read_text())
    cfg.pop("csv_monitor", None)
    for key, value in changes.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    suffix = "_" + "_".join(sorted(changes)) if changes else ""
    path = tmp / f"{name}{suffix}.json"
    path.write_text(json.dumps(cfg))
    return path


def train_args(dvae_dir, out, config, *extra):
    """DALL-E trainer arguments of the tests: the trainer's defaults (BPE dropout 0.1 included)."""
    return [
        "--deepspeed_config",
        config,
        "--preset",
        "dalle-tiny",
        "--dvae",
        dvae_dir,
        "--output-dir",
        out,
        "--steps",
        STEPS,
        "--micro-batch-size",
        2,
        "--lr",
        3e-3,
        "--warmup-steps",
        1,
        "--save-every",
        2,
        "--no-progress",
        "--data-size",
        64,
        *extra,
    ]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in metrics(out)]


def crash_and_resume(script, args, faults, check_crashed=lambda out: None, **launch_kw):
    """Run until the injected failure (``faults``, see :func:`launch`) kills a rank, check the wreck,
    relaunch with --resume (with the same faults but the kill)."""
    out = Path(args[args.index("--output-dir") + 1])
    crashed = launch(script, *args, faults=faults, **launch_kw)
    assert crashed.returncode != 0
    check_crashed(out)
    again = {k: v for k, v in faults.items() if not k.startswith("kill_")}
    resumed = launch(script, *args, "--resume", faults=again, **launch_kw)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return resumed


def resume_copy(script, args, reference: Path, tag: str = "step00000004", **launch_kw):
    """Resume from checkpoint ``tag`` of the finished run ``reference``: its folder copied to the
    ``--output-dir`` of ``args`` (the later checkpoints and the export left out, ``latest`` set to
    ``tag``), then relaunched with --resume. The checkpoint is the one a run killed after it would
    resume from, so this checks exact resume without a run that crashes (the crash itself is tested
    with :func:`crash_and_resume`)."""
    out = Path(args[args.index("--output-dir") + 1])
    step = int(tag.removeprefix("step"))

    def later(folder, names):
        return [n for n in names if n == "final" or (n.startswith("step") and n[4:].isdigit() and int(n[4:]) > step)]

    shutil.copytree(reference, out, ignore=later)
    (out / "checkpoints" / "latest").write_text(tag)
    resumed = launch(script, *args, "--resume", **launch_kw)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {tag}" in resumed.stdout
    return resumed
