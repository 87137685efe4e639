"""Training on 2 CPU ranks (gloo), started as the `deepspeed` launcher starts them, through the
launcher itself where its behaviour is part of the test, and in-process (one rank) where the
trainer's logic needs no second rank."""

import json
import math
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port
from launching import (
    STEPS,
    assert_resumed,
    crash_and_resume,
    ds_config,
    launch,
    losses,
    metrics,
    resume_copy,
    train_args,
)
from shared_runs import RANK4, RUNS, run_stage, stream_powersgd_run, stream_run_args, vq_dvae_run

from dalle_ds import load_model
from dalle_ds.inference.generation import load_pipeline
from dalle_ds.training import DalleRunConfig, DalleTrainer, DVAERunConfig, DVAETrainer, parse_run_config


@pytest.mark.parametrize("name", list(RUNS))
def test_zero_stages_train_and_keep_ranks_identical(name, workdir, dvae_dir):
    out, proc = run_stage(name, workdir, dvae_dir)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    values = losses(out)
    assert len(values) == STEPS and all(math.isfinite(v) for v in values)
    assert values[-1] < values[0] - 0.5, values
    hashes = {(out / f"param_sha256_rank{r}.txt").read_text() for r in range(2)}
    assert len(hashes) == 1, "ranks diverged"
    model, _ = load_pipeline(out / "final")  # consolidated fp32 export + tokenizer + dVAE
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 848640
    assert (out / "checkpoints" / "latest").read_text() == f"step{STEPS:08d}"


def test_zero3_and_zero0_follow_the_same_loss_trajectory(workdir, dvae_dir):
    a = losses(run_stage("zero0", workdir, dvae_dir)[0])
    b = losses(run_stage("zero3", workdir, dvae_dir)[0])
    # Same data, same initial weights; only the reduction order differs (fp32 sums over other buckets).
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-3, atol=1e-3)


@pytest.mark.slow  # 14 s; a crash and exact resume also run by default in the kill-during-save test below
def test_kill_9_one_rank_then_resume_continues_exactly(workdir, dvae_dir):
    ref = losses(run_stage("zero2", workdir, dvae_dir)[0])
    out = workdir / "crash"
    cfg = ds_config(workdir, 2)

    def check(out):
        assert (out / "checkpoints" / "latest").read_text() == "step00000004"

    crash_and_resume(  # the launcher stops the surviving rank and fails the job
        "train_dalle.py", train_args(dvae_dir, out, cfg), {"kill_after_step": 5}, check_crashed=check, launcher=True
    )
    assert_resumed(out)
    got = losses(out)
    assert len(got) == STEPS
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-6, atol=1e-6)


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(workdir, dvae_dir):
    ref = losses(run_stage("zero2", workdir, dvae_dir)[0])
    out = workdir / "save_crash"
    cfg = ds_config(workdir, 2)

    def check(out):
        ckpts = out / "checkpoints"
        assert (ckpts / "latest").read_text() == "step00000002"
        assert (ckpts / "step00000004").exists() and not (ckpts / "step00000004" / "complete.json").exists()

    crash_and_resume(
        "train_dalle.py", train_args(dvae_dir, out, cfg), {"kill_in_save": 4}, check_crashed=check
    )
    assert_resumed(out)
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(ref), rtol=1e-6, atol=1e-6)


def test_bad_batch_config_fails_before_training_with_the_keys_named(workdir, dvae_dir, single_process_group):
    from dalle_ds.distributed.ds_config import DeepSpeedConfigError

    cfg = json.loads((ROOT / "ds_configs" / "cpu_zero2_fp32.json").read_text())
    cfg["train_batch_size"] = 7
    path = workdir / "bad_batch.json"
    path.write_text(json.dumps(cfg))
    run = parse_run_config(DalleRunConfig, [str(a) for a in train_args(dvae_dir, workdir / "bad", path)])
    with pytest.raises(DeepSpeedConfigError) as err:
        DalleTrainer(run)
    assert "bad_batch.json: train_batch_size=7 is not divisible by train_micro_batch_size_per_gpu=2 x world size 1" in (
        str(err.value)
    )
    assert not (workdir / "bad" / "metrics.jsonl").exists()


def test_dalle_trains_on_webdataset_shards_and_resumes_the_stream_exactly(workdir, dvae_dir, shards):
    """Tar shards read by 2 workers per rank, with PowerSGD compressing: the resumed run continues
    the stream without repeats (its counts equal the uninterrupted run's) and the error feedback, so
    its losses equal the uninterrupted run's."""
    ref = stream_powersgd_run(workdir, dvae_dir, shards)
    counts = json.loads((ref / "data_counts.json").read_text())
    assert counts == {"samples": STEPS * 2 * 2}  # 2 ranks x micro-batch 2 per step, nothing skipped
    hashes = {(ref / f"param_sha256_rank{r}.txt").read_text() for r in range(2)}
    assert len(hashes) == 1, "ranks diverged"
    out = workdir / "stream_resumed"
    resume_copy("train_dalle.py", stream_run_args(workdir, dvae_dir, shards, out), ref)
    torch.testing.assert_close(torch.tensor(losses(out)), torch.tensor(losses(ref)), rtol=1e-6, atol=1e-6)
    assert json.loads((out / "data_counts.json").read_text()) == counts  # the resumed stream did not repeat
    shares = [row["null_caption_share"] for row in metrics(ref)]
    assert len(shares) == STEPS and 0 < sum(shares) / STEPS < 1, shares  # caption dropout (seeded) took part


def test_dalle_trains_on_codes_precomputed_by_encode_images(workdir, dvae_dir, shards):
    codes = workdir / "codes"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "encode_images.py"), "--dvae", dvae_dir, "--data", shards]
        + ["--out", codes, "--workers", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = workdir / "codes_run"
    args = train_args(dvae_dir, out, ds_config(workdir, 2), "--check-sync", "--data", codes, "--data-workers", 1)
    proc = launch("train_dalle.py", *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    values = losses(out)
    assert len(values) == STEPS and values[-1] < values[0] - 0.5
    assert json.loads((out / "data_counts.json").read_text()) == {"samples": STEPS * 2 * 2}


def test_dvae_trainer_runs_its_schedules(workdir, single_process_group):
    out = workdir / "dvae_run"
    cfg = ds_config(workdir, 2)
    run = parse_run_config(DVAERunConfig, [
        "--deepspeed_config", str(cfg), "--preset", "dvae-tiny", "--output-dir", str(out), "--steps", "8",
        "--micro-batch-size", "4", "--lr", "1e-3", "--no-progress", "--ema", "--check-sync",
    ])  # fmt: skip
    DVAETrainer(run).run()
    rows = metrics(out)
    taus = [r["temperature"] for r in rows]
    assert taus[0] == pytest.approx(1.0) and taus == sorted(taus, reverse=True)
    assert rows[-1]["kl_weight"] == pytest.approx(6.6)
    assert rows[-1]["recon_nll"] < rows[0]["recon_nll"]
    assert (out / "images" / f"recon_{8:08d}.png").exists()
    ema, final = load_model(out / "final_ema"), load_model(out / "final")
    assert not torch.equal(next(ema.parameters()), next(final.parameters()))


def test_vq_dvae_trainer_keeps_one_codebook_on_every_rank(workdir):
    out = vq_dvae_run(workdir)
    rows = metrics(out)
    assert "commitment" in rows[0] and "temperature" not in rows[0] and "recon_nll" not in rows[0]
    assert rows[-1]["mse"] < rows[0]["mse"]
    vae = load_model(out / "final")
    assert vae.config.quantizer == "vq" and bool(vae.quantizer.initialized)
    hashes = [p.read_text() for p in sorted(out.glob("param_sha256_rank*.txt"))]
    assert len(hashes) == 2 and len(set(hashes)) == 1  # --check-sync hashes the codebook buffers too


# ZeRO 1 reads like ZeRO 2 (flat partitions) and offloaded ZeRO 3 like ZeRO 3: those two run with -m slow.
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in ("zero1", "zero3_offload") else n for n in RUNS]
)
def test_sharded_streaming_export_equals_deepspeeds_consolidation(name, workdir, dvae_dir, tmp_path):
    """Every stage's checkpoint, exported in 64 KB shards by scripts/export_checkpoint.py (any tag),
    holds exactly the weights DeepSpeed's own zero_to_fp32 consolidates in memory (ZeRO 0: the
    module's, as trained)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dalle_ds.inference.serialization import weight_files

    out = run_stage(name, workdir, dvae_dir)[0]
    ckpt, tag = out / "checkpoints", "step00000004"
    script = ROOT / "scripts" / "export_checkpoint.py"
    argv = ["--checkpoint-dir", str(ckpt), "--out", str(tmp_path / "x"), "--tag", tag, "--max-shard-size", "64KB"]
    if name == "zero3":  # the command itself, in a fresh interpreter
        proc = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
    else:  # the same script's main in this process
        assert runpy.run_path(str(script))["main"](argv) == 0
    assert len(weight_files(tmp_path / "x")) > 10
    got = load_model(tmp_path / "x").state_dict()
    if name == "zero0":
        reference = torch.load(ckpt / tag / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    else:
        reference = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)
    assert set(got) == set(reference)
    assert all(torch.equal(got[k], reference[k].float()) for k in got)
    final = load_model(out / "final").state_dict()  # the trainer's own export is of step 6, not 4
    key = "blocks.0.attn.qkv.weight"
    assert set(final) == set(got) and not torch.equal(final[key], got[key])


def test_non_finite_loss_stops_with_a_message_and_a_checkpoint(workdir, dvae_dir, single_process_group):
    from dalle_ds.training import TrainingStopped

    out = workdir / "diverge"
    args = [str(a) for a in train_args(dvae_dir, out, ds_config(workdir, 2), "--max-bad-steps", 2)]
    args[args.index("--lr") + 1] = "1e6"  # Adam takes ~lr-sized steps: the weights blow up at once
    args[args.index("--steps") + 1] = "30"
    with pytest.raises(TrainingStopped, match="loss was non-finite for 2 consecutive steps"):
        DalleTrainer(parse_run_config(DalleRunConfig, args)).run()
    tag = (out / "checkpoints" / "latest").read_text()
    assert (out / "checkpoints" / tag / "complete.json").exists()
    stopped_at = int(tag.removeprefix("step"))
    assert stopped_at < 30
    rows = metrics(out)
    assert not math.isfinite(rows[-1]["loss"]) and rows[-1]["step"] == stopped_at


# --- PowerSGD communication hook -------------------------------------------------------------


def hook_config(tmp: Path, name: str, stage: int, hook: dict | None) -> Path:
    base = json.loads((ROOT / "ds_configs" / "cpu_zero2_fp32.json").read_text())
    base.pop("csv_monitor", None)
    base["zero_optimization"] = {"stage": stage, **({"reduce_scatter": False} if stage in (1, 2) else {})}
    if hook is not None:
        base["communication_hook"] = {"type": "powersgd", **hook}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(base))
    return path


_hook_runs: dict[str, Path] = {}


def run_hooked(name, workdir, dvae_dir, stage, hook, *extra):
    if name not in _hook_runs:
        out = workdir / name
        proc = launch(
            "train_dalle.py",
            *train_args(dvae_dir, out, hook_config(workdir, name, stage, hook), "--check-sync", *extra),
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        _hook_runs[name] = out
    return _hook_runs[name]


def test_powersgd_exact_mode_is_bit_identical_to_deepspeeds_own_reduction(workdir, dvae_dir):
    # Guards the DeepSpeed internals the hook replaces (optimizer.gradient_reduction_w_predivide).
    plain = run_stage("zero2", workdir, dvae_dir)[0]  # hook_config(stage 2, no hook) as run_stage makes it
    exact = run_hooked("psgd_exact_zero2", workdir, dvae_dir, 2, {"exact": True})
    assert (exact / "param_sha256_rank0.txt").read_text() == (plain / "param_sha256_rank0.txt").read_text()
    assert losses(exact) == losses(plain)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_powersgd_trains_with_identical_ranks_and_less_traffic(stage, workdir, dvae_dir, shards):
    if stage == 2:  # the shipped cpu_zero2_fp32_powersgd.json, on streamed data
        out = stream_powersgd_run(workdir, dvae_dir, shards)
    else:
        out = run_hooked(f"psgd_rank4_zero{stage}", workdir, dvae_dir, stage, RANK4)
    hashes = {(out / f"param_sha256_rank{r}.txt").read_text() for r in range(2)}
    assert len(hashes) == 1, "ranks diverged under PowerSGD"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["comm_bytes"] == rows[0]["comm_bytes_plain"]  # before start_iter: plain all-reduce
    assert rows[-1]["comm_bytes"] < 0.2 * rows[-1]["comm_bytes_plain"]
    values = [r["loss"] for r in rows]
    assert all(math.isfinite(v) for v in values) and values[-1] < values[0] - 0.5


def test_two_nodes_x_two_ranks_hierarchical_powersgd(workdir, dvae_dir):
    """Two "nodes" as two launcher processes on this machine (--no_ssh --node_rank), 2 ranks each:
    ZeRO-2 with hierarchical PowerSGD (exact inside a node, compressed row shards across nodes)."""
    out = workdir / "two_nodes"
    hostfile = workdir / "hostfile_two_nodes"
    hostfile.write_text("node-a slots=2\nnode-b slots=2\n")
    cfg = hook_config(workdir, "two_nodes", 2, {**RANK4, "hierarchical": True})
    args = train_args(dvae_dir, out, cfg, "--check-sync")[2:]  # launch.sh adds --deepspeed_config
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "NO_SSH": "1"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), GLOO_SOCKET_IFNAME="lo")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's deepspeed
    launch_sh = [
        "bash",
        str(ROOT / "scripts" / "launch.sh"),
        str(hostfile),
        str(cfg),
        str(ROOT / "scripts" / "train_dalle.py"),
    ]
    nodes = [
        subprocess.Popen(
            [*launch_sh, *map(str, args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env={**env, "NODE_RANK": str(node)},
        )
        for node in (0, 1)
    ]
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, log in zip(nodes, logs, strict=True):
        assert node.returncode == 0, log[-4000:]
    assert "launch check ok: 4 ranks (node-a:2, node-b:2)" in logs[0]
    hashes = {(out / f"param_sha256_rank{r}.txt").read_text() for r in range(4)}
    assert len(hashes) == 1, "ranks diverged"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS  # one metrics writer (global rank 0), not one per node
    # Before start_iter each rank sends its half (row shard) of the node-averaged gradient across
    # nodes uncompressed; after it, P and Q of its half of every matrix: under a tenth of plain.
    assert rows[0]["comm_bytes"] * 2 == rows[0]["comm_bytes_plain"]
    assert rows[-1]["comm_bytes"] < 0.1 * rows[-1]["comm_bytes_plain"]
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == f"step{STEPS:08d}"
    assert sorted(p.name for p in ckpts.glob("step*")) == ["step00000004", "step00000006"]  # the last 2 kept
    for step_dir in ckpts.glob("step*"):
        assert (step_dir / "complete.json").is_file()
        assert len(list(step_dir.glob("*optim_states.pt"))) == 4  # one ZeRO-2 shard per rank


@pytest.fixture
def loopback_sshd(tmp_path):
    """An sshd on a free loopback port that accepts a key made here, plus a PATH directory whose
    ``ssh`` uses it: what pdsh and DeepSpeed's runner call. Needs Debian's openssh-server + pdsh."""
    import shutil
    import time

    missing = [tool for tool in ("pdsh", "ssh", "ssh-keygen") if shutil.which(tool) is None]
    if missing or not Path("/usr/sbin/sshd").exists():
        pytest.fail(f"missing {missing or ['sshd']}: apt-get install pdsh openssh-server openssh-client")
    d = tmp_path / "ssh"
    d.mkdir()
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name)], check=True)
    (d / "authorized_keys").write_text((d / "client_key.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nStrictModes no\nUsePAM no\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE)
    (d / "ssh_config").write_text(
        f"Host *\n  Port {port}\n  IdentityFile {d / 'client_key'}\n  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n"
    )
    bin_dir = d / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {d / "ssh_config"} "$@"\n')
    wrapper.chmod(0o755)
    for _ in range(50):  # until it accepts connections
        probe = subprocess.run([str(wrapper), "127.0.0.1", "true"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            break
        time.sleep(0.2)
    else:
        sshd.kill()
        pytest.fail(f"sshd on 127.0.0.1:{port} did not accept the test key: {probe.stderr.decode()[-500:]}")
    yield bin_dir
    sshd.kill()


@pytest.mark.slow
def test_pdsh_launch_over_ssh_to_two_loopback_hosts(workdir, dvae_dir, loopback_sshd):
    """The default multi-node path: launch.sh -> deepspeed --hostfile -> pdsh -> ssh -> each "node"
    (localhost and 127.0.0.1, one rank each), remote ranks in this venv through --venv_script."""
    out = workdir / "pdsh"
    hostfile = workdir / "hostfile_pdsh"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    cfg = hook_config(workdir, "pdsh", 2, {**RANK4, "hierarchical": True})
    args = train_args(dvae_dir, out, cfg, "--check-sync")[2:]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    env["PATH"] = f"{loopback_sshd}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["DS_EXTRA"] = f"--venv_script {Path(sys.executable).parent / 'activate'}"
    env["DS_ENV_VARS"] = "OMP_NUM_THREADS"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "launch.sh"), str(hostfile), str(cfg), str(ROOT / "scripts" / "train_dalle.py")]
        + [str(a) for a in args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "pdsh" in log and "launch check ok: 2 ranks (localhost:1, 127.0.0.1:1)" in log
    assert "export OMP_NUM_THREADS=1" in log  # forwarded to every node through the env file
    assert "parameters identical on all 2 ranks" in log
    assert (out / "checkpoints" / "latest").read_text() == f"step{STEPS:08d}"


@pytest.mark.slow
def test_powersgd_rank4_loss_within_3_percent_of_uncompressed(workdir, dvae_dir):
    """40 steps of the tiny preset; measured here: +2.6% (mean of the last 5 losses), rank 4 from step 10."""

    def run(name, hook):
        out = workdir / name
        args = train_args(dvae_dir, out, hook_config(workdir, name, 2, hook))
        for key, value in (("--steps", 40), ("--data-size", 256), ("--micro-batch-size", 4)):
            args[args.index(key) + 1] = value
        proc = launch("train_dalle.py", *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return sum(losses(out)[-5:]) / 5

    plain = run("slow_plain", None)
    compressed = run("slow_rank4", {"rank": 4, "start_iter": 10, "min_compression_rate": 1.5})
    assert compressed <= 1.03 * plain, (compressed, plain)
