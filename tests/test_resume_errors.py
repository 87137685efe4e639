"""--resume with a checkpoint that does not fit the run stops with one message naming the checkpoint
and the difference, before anything is loaded or moved: another model config, the other trainer's
checkpoint, another dVAE, a newer checkpoint format. The checkpoints are copies of the 2-rank ZeRO-2
test run's; the trainers resume them in this process on one rank, and through the command line on 2
ranks, where rank 0 alone prints the message and every rank exits with status 2."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from launching import STEPS, ds_config, launch, train_args
from shared_runs import copied_zero2_run

from dalle_ds import DiscreteVAE, get_preset, load_dvae, save_model
from dalle_ds.models.config import save_config
from dalle_ds.training.checkpointing import COMPLETE, FORMAT
from dalle_ds.training.errors import UsageError
from dalle_ds.training.resume_checks import CheckpointMismatch, weights_sha256
from dalle_ds.training.run_args import parse_run_config
from dalle_ds.training.run_config import DalleRunConfig, DVAERunConfig

NEWEST = f"step{STEPS:08d}"


@pytest.fixture
def run(workdir, dvae_dir, tmp_path):
    """A copy of the finished ZeRO-2 DALL-E run (checkpoints step4 and step6) without its export."""
    return copied_zero2_run(workdir, dvae_dir, tmp_path / "run")[1]


def listing(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def zero2_config(workdir: Path) -> Path:
    return ds_config(workdir, 2, reduce_scatter=False)  # the zero2 run's


def edit_marker(run: Path, **changes) -> None:
    marker = run / "checkpoints" / NEWEST / COMPLETE  # not among the files it records: still intact
    marker.write_text(json.dumps({**json.loads(marker.read_text()), **changes}))


def dalle_trainer(workdir, dvae, run, *extra):
    from dalle_ds.training.dalle_trainer import DalleTrainer

    args = train_args(dvae, run, zero2_config(workdir), "--resume", *extra)
    return DalleTrainer(parse_run_config(DalleRunConfig, [str(a) for a in args]))


def refused(make, run: Path) -> str:
    """The message of the CheckpointMismatch ``make()`` raises, having loaded and moved nothing."""
    before = listing(run / "checkpoints")
    with pytest.raises(CheckpointMismatch) as err:
        make()
    assert listing(run / "checkpoints") == before
    message = str(err.value)
    assert message.startswith(f"--resume: {run / 'checkpoints' / NEWEST} "), message
    return message


def test_a_checkpoint_records_the_dvae_it_was_trained_with(run, dvae_dir):
    frozen = json.loads((run / "checkpoints" / NEWEST / COMPLETE).read_text())["frozen"]
    assert frozen == {"dvae": {"path": str(dvae_dir), "sha256": weights_sha256(load_dvae(dvae_dir))}}


def test_another_model_config_is_refused_with_every_differing_key(
    run, workdir, dvae_dir, tmp_path, single_process_group
):
    smaller = tmp_path / "smaller.yaml"
    save_config(dataclasses.replace(get_preset("dalle-tiny"), d_model=64, n_layers=2), smaller)
    message = refused(lambda: dalle_trainer(workdir, dvae_dir, run, "--preset", smaller), run)
    assert "another model config (it was written with --preset dalle-tiny)" in message
    assert "checkpoint -> this run: d_model: 128 -> 64, n_layers: 4 -> 2." in message


def test_a_dvae_checkpoint_is_refused_by_the_dalle_trainer(run, workdir, dvae_dir, single_process_group):
    edit_marker(run, model_config=get_preset("dvae-tiny").to_dict())  # as the dVAE trainer writes it
    message = refused(lambda: dalle_trainer(workdir, dvae_dir, run), run)
    assert "is a dvae checkpoint, written by the dvae trainer; this is the dalle trainer." in message


def test_a_dalle_checkpoint_is_refused_by_the_dvae_trainer(run, workdir, single_process_group):
    from dalle_ds.training.dvae_trainer import DVAETrainer

    args = ["--deepspeed_config", zero2_config(workdir), "--preset", "dvae-tiny",
            "--output-dir", run, "--steps", STEPS, "--micro-batch-size", 2, "--no-progress", "--resume"]  # fmt: skip
    message = refused(lambda: DVAETrainer(parse_run_config(DVAERunConfig, [str(a) for a in args])), run)
    assert "is a dalle checkpoint, written by the dalle trainer; this is the dvae trainer." in message


@pytest.fixture
def other_dvae(tmp_path) -> Path:
    torch.manual_seed(1)
    return save_model(DiscreteVAE(get_preset("dvae-tiny")), tmp_path / "other_dvae")


def test_another_dvae_is_refused_once_by_rank_0_with_both_named(run, workdir, dvae_dir, other_dvae):
    """Through the command line on 2 ranks: every rank refuses the checkpoint, rank 0 alone prints
    (another rank would name itself), no traceback, exit status 2, the checkpoints untouched."""
    before = listing(run / "checkpoints")
    proc = launch("train_dalle.py", *train_args(other_dvae, run, zero2_config(workdir)), "--resume")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    old, new = (weights_sha256(load_dvae(d))[:16] for d in (dvae_dir, other_dvae))
    message = (f"error: --resume: {run / 'checkpoints' / NEWEST} does not fit this run: another --dvae: {dvae_dir} "
               f"(weights SHA-256 {old}) when saved, {other_dvae} ({new}) now.")  # fmt: skip
    assert proc.stderr.count("error") == 1 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert listing(run / "checkpoints") == before


def test_a_newer_format_reaches_the_user_as_one_message(run, workdir, dvae_dir):
    edit_marker(run, format=FORMAT + 1)
    proc = launch("train_dalle.py", *train_args(dvae_dir, run, zero2_config(workdir)), "--resume")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stderr.count("error") == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    assert f"error: {run / 'checkpoints' / NEWEST}: checkpoint format {FORMAT + 1}, written by a newer" in proc.stderr


@pytest.mark.parametrize(
    "rank, alike, printed", [(0, True, "error: x\n"), (1, True, ""), (1, False, "error (rank 1): x\n")]
)
def test_a_stop_is_printed_by_rank_0_and_by_another_rank_only_when_not_raised_alike(
    monkeypatch, capsys, rank, alike, printed
):
    from dalle_ds.training import cli

    monkeypatch.setattr(cli.dd, "is_initialized", lambda: False)  # before the process group: the launcher's RANK
    monkeypatch.setenv("RANK", str(rank))
    cli._report_stop(UsageError("x"), alike=alike)
    assert capsys.readouterr().err == printed
