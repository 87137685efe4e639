"""Preemption (``dalle_ds/training/preemption.py``): a signalled job saves the step it reached on every
rank and exits 75, and ``--resume`` continues on the uninterrupted run's losses.

2 ranks, dalle-tiny, ZeRO-2, 6 steps on tar shards read by 2 data workers per rank (the workers get
the signals too). The signals come from the trainer's test-only fault seam at a known step
(``dalle_ds/training/faults.py``), so each run stops at the same step however slow the machine is.
The runs chain: a SIGTERM to the job's process group stops the first at step 3, a SIGTERM to one
rank stops its resumed run at step 5, a SIGUSR1 to ``scripts/launch.sh`` stops the last at step 6;
together they give the uninterrupted run's losses.
"""

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, free_port
from launching import assert_resumed, ds_config, launch, losses, metrics, train_args

from dalle_ds.training.faults import ENV as FAULTS_ENV
from dalle_ds.training.preemption import PREEMPTED_EXIT_CODE

SCRIPT = ROOT / "scripts" / "train_dalle.py"
_runs: dict[str, Any] = {}


def run_args(workdir: Path, dvae_dir: Path, shards: Path, out: Path) -> list[str]:
    stream = ("--data", shards, "--data-workers", 2, "--shuffle-buffer", 16)
    return [str(a) for a in train_args(dvae_dir, out, ds_config(workdir, 2), *stream)]


def _env(faults: dict) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", FAULTS_ENV: json.dumps(faults)}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's deepspeed
    return env


def run_ranks(args: list[str], faults: dict, nprocs: int = 2) -> tuple[list[int], str]:
    """``nprocs`` ranks of the DALL-E trainer in one new process group, as plain processes with the
    environment the deepspeed launcher gives them; every rank's exit status and all their output."""
    env, port = _env(faults), str(free_port())
    procs: list[subprocess.Popen] = []
    try:
        for rank in range(nprocs):
            rank_env = {**env, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nprocs),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}  # fmt: skip
            cmd = [sys.executable, str(SCRIPT), f"--local_rank={rank}", *args]
            group = procs[0].pid if procs else 0  # rank 0 leads the group
            procs.append(subprocess.Popen(cmd, env=rank_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          text=True, process_group=group))  # fmt: skip
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [p.returncode for p in procs], "".join(logs)


def reference(workdir: Path, dvae_dir: Path, shards: Path) -> list[float]:
    """The uninterrupted run's losses."""
    if "reference" not in _runs:
        out = workdir / "preempt_reference"
        proc = launch("train_dalle.py", *run_args(workdir, dvae_dir, shards, out))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _runs["reference"] = losses(out)
    return _runs["reference"]


def preempted(name: str, workdir: Path, dvae_dir: Path, shards: Path, faults: dict, resume: Path | None = None):
    """(output folder, exit statuses, log) of a run that ``faults`` signals; with ``resume``, the
    run resumes a copy of that folder. Made once per session."""
    if name not in _runs:
        out = workdir / name
        args = run_args(workdir, dvae_dir, shards, out)
        if resume is not None:
            shutil.copytree(resume, out)
            args.append("--resume")
        _runs[name] = (out, *run_ranks(args, faults))
    return _runs[name]


def group_run(workdir, dvae_dir, shards):
    """SIGTERM to the job's process group after step 3, and again while step 3 is being saved."""
    faults = {"signal_after_step": 3, "signal_in_save": 3, "signal_to": "group"}
    return preempted("preempt_group", workdir, dvae_dir, shards, faults)


def one_rank_run(workdir, dvae_dir, shards):
    """The group run resumed; SIGTERM to rank 1 alone after step 5."""
    resume = group_run(workdir, dvae_dir, shards)[0]
    return preempted("preempt_one_rank", workdir, dvae_dir, shards, {"signal_after_step": 5}, resume)


def latest(out: Path) -> str:
    tag = (out / "checkpoints" / "latest").read_text()
    assert (out / "checkpoints" / tag / "complete.json").is_file()
    return tag


def test_sigterm_to_the_process_group_saves_the_step_reached_and_exits_75(workdir, dvae_dir, shards):
    out, codes, log = group_run(workdir, dvae_dir, shards)
    assert codes == [PREEMPTED_EXIT_CODE] * 2, log[-3000:]
    assert "preempted by SIGTERM at step 3: saved it in" in log
    assert [row["step"] for row in metrics(out)] == [1, 2, 3]
    assert latest(out) == "step00000003"  # complete, although a second SIGTERM came during the save


def test_sigterm_to_one_rank_stops_every_rank_and_resume_continues_exactly(workdir, dvae_dir, shards):
    out, codes, log = one_rank_run(workdir, dvae_dir, shards)
    assert codes == [PREEMPTED_EXIT_CODE] * 2, log[-3000:]
    assert "resumed from step00000003" in log and "preempted by SIGTERM at step 5" in log
    assert latest(out) == "step00000005"
    assert_resumed(out)
    expected = reference(workdir, dvae_dir, shards)[:5]
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_launch_sh_forwards_sigusr1_to_the_ranks_and_exits_75(workdir, dvae_dir, shards):
    """SLURM's ``--signal=B:USR1@120``: the batch script (here launch.sh, the session leader) is
    signalled and signals the ranks; DeepSpeed's launchers, left running, pass the ranks' status on."""
    out = workdir / "preempt_launch_sh"
    shutil.copytree(one_rank_run(workdir, dvae_dir, shards)[0], out)
    hostfile = workdir / "hostfile_preempt"
    hostfile.write_text("localhost slots=2\n")
    args = run_args(workdir, dvae_dir, shards, out)
    env = _env({"signal_after_step": 6, "signal_name": "USR1", "signal_to": "session"})
    env.update(NO_SSH="1", NODE_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    cmd = ["bash", str(ROOT / "scripts" / "launch.sh"), str(hostfile), args[1], str(SCRIPT), *args[2:], "--resume"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env,
                          start_new_session=True)  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode == PREEMPTED_EXIT_CODE, log[-4000:]
    assert "preempted by SIGUSR1 at step 6" in log
    assert latest(out) == "step00000006"
    assert_resumed(out)
    expected = reference(workdir, dvae_dir, shards)
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.slow  # 11 s; a preemption checkpoint is a checkpoint: exports are compared by default in test_training.py
def test_a_checkpoint_written_on_preemption_exports_as_deepspeed_consolidates_it(workdir, dvae_dir, shards, tmp_path):
    """scripts/export_checkpoint.py (streaming, the latest tag) on the step-3 checkpoint the group
    run saved when signalled: the weights DeepSpeed's own zero_to_fp32 consolidates in memory."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dalle_ds import load_model

    ckpt = group_run(workdir, dvae_dir, shards)[0] / "checkpoints"
    script = runpy.run_path(str(ROOT / "scripts" / "export_checkpoint.py"))
    argv = ["--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "x"), "--max-shard-size", "64KB"]
    assert script["main"](argv) == 0
    got = load_model(tmp_path / "x").state_dict()
    reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="step00000003")
    assert set(got) == set(reference) and len(got) > 10
    assert all(torch.equal(got[k], reference[k].float()) for k in got)
