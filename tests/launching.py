"""Helpers for tests that train on several ranks (2 CPU processes, gloo): started as the `deepspeed`
launcher starts them, or through the launcher itself where its behaviour is under test."""

import json
import os
import shutil
import subprocess
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


_SERVER = None


def _fork_server():
    """The multiprocessing context whose fork server has imported what ranks import (rank_server)."""
    global _SERVER
    if _SERVER is None:
        import multiprocessing
        from multiprocessing import forkserver

        _SERVER = multiprocessing.get_context("forkserver")
        _SERVER.set_forkserver_preload(["rank_server"])
        # The server imports its preload before it applies this process's sys.path (Python 3.11), so
        # it finds rank_server through PYTHONPATH; an import error there would be ignored silently.
        saved = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "tests"), saved]))
        try:
            forkserver.ensure_running()
        finally:
            if saved is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = saved
    return _SERVER


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def spawn_ranks(script: Path, argv: list[str], nprocs: int, env: dict[str, str], timeout: float):
    """Start ``nprocs`` ranks of ``script`` on this machine with the environment
    ``deepspeed.launcher.launch`` gives them (its variables, ``--local_rank=i`` first), forked from a
    process that has imported torch and DeepSpeed already (tests/rank_server.py), without the
    launcher's own two Python processes: ~5 s less per run on 2 cores. Like the launcher, when a rank
    fails the others are stopped. stdout/stderr hold every rank's output in rank order."""
    import rank_server

    ctx, port = _fork_server(), str(free_port())
    logs = tempfile.mkdtemp(prefix="ranks")
    procs = []
    for rank in range(nprocs):
        rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs),
                    "LOCAL_SIZE": str(nprocs), "CROSS_RANK": "0", "CROSS_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": port}  # fmt: skip
        files = (f"{logs}/out{rank}", f"{logs}/err{rank}")
        args = (str(script), [f"--local_rank={rank}", *argv], rank_env, *files)
        proc = ctx.Process(target=rank_server.run_rank, args=args)
        proc.start()
        procs.append(proc)
    deadline = time.monotonic() + timeout
    code = 0
    try:
        while any(p.exitcode is None for p in procs):
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed and not code:  # a dead rank leaves the others waiting in a collective: stop them
                code = failed[0]
                for p in procs:
                    if p.exitcode is None:
                        p.kill()
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(script), timeout)
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.exitcode is None:
                p.kill()
            p.join()
    code = code or next((p.exitcode for p in procs if p.exitcode), 0)
    out, err = ("".join(_read(Path(f"{logs}/{kind}{r}")) for r in range(nprocs)) for kind in ("out", "err"))
    shutil.rmtree(logs, ignore_errors=True)
    return subprocess.CompletedProcess([str(script), *argv], code, out, err)


def launch(script, *args, nprocs=2, timeout=300, fp16_on_cpu=False, record=None, faults=None, launcher=False):
    """Run ``scripts/<script>`` on ``nprocs`` ranks: with the environment the deepspeed launcher gives
    them, forked from a process that has imported torch and DeepSpeed (:func:`spawn_ranks`), or, with
    ``launcher=True``, through the real ``deepspeed`` launcher in fresh interpreters (for tests of what
    the launcher itself does). ``fp16_on_cpu``: patch DeepSpeed's fp16 capability check
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
        proc = spawn_ranks(ROOT / "scripts" / script, [str(a) for a in args], nprocs, env, timeout)
    # DeepSpeed's CPU shm all-reduce op never unlinks its segments; init_distributed skips it.
    leaked = shm_segments() - before
    assert not leaked, f"/dev/shm segments left behind by the run: {sorted(leaked)}"
    return proc


def ds_config(tmp: Path, stage: int, **extra) -> Path:
    base = json.loads((ROOT / "ds_configs" / "cpu_zero2_fp32.json").read_text())
    base["zero_optimization"] = {"stage": stage, **({"reduce_scatter": True} if stage in (1, 2) else {}), **extra}
    base.pop("csv_monitor", None)
    path = tmp / f"ds_stage{stage}{''.join('_' + k for k in sorted(extra))}.json"
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


def crash_and_resume(script, args, faults, check_crashed=lambda out: None, launcher=False, **launch_kw):
    """Run until the injected failure (``faults``, see :func:`launch`) kills a rank (``launcher``: the
    crashed run under the real launcher), check the wreck, relaunch with --resume (with the same
    faults but the kill)."""
    out = Path(args[args.index("--output-dir") + 1])
    crashed = launch(script, *args, faults=faults, launcher=launcher, **launch_kw)
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
    assert_resumed(out)
    return resumed


def assert_resumed(out: Path) -> None:
    """metrics.jsonl holds each step once: the resumed run cut the lines past its checkpoint and
    continued from there (a run started afresh would have appended a second step 1)."""
    steps = [row["step"] for row in metrics(out)]
    assert steps == list(range(1, len(steps) + 1)), steps
