"""Checkpoint integrity: every file's size and SHA-256 in the marker, verified by --resume, which
steps over a damaged or incomplete newest checkpoint to the newest intact one (and stops, deleting
nothing, when none is intact). The damaged checkpoints are copies of the 2-rank ZeRO-2 test run's."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from launching import STEPS, assert_resumed, ds_config, launch, losses, metrics, train_args
from shared_runs import copied_zero2_run

from dalle_ds.training import integrity
from dalle_ds.training.checkpointing import COMPLETE, FORMAT, Checkpointer, CheckpointError

MODEL_STATES = "mp_rank_00_model_states.pt"


def truncate(path: Path) -> None:  # as a copy cut short leaves it
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_byte(path: Path) -> None:  # size unchanged
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGE = {  # name: (file in the checkpoint, what is done to it, what the report says)
    "truncated": (MODEL_STATES, truncate, "bytes,"),
    "flipped_byte": ("zero_pp_rank_1_mp_rank_00_optim_states.pt", flip_byte, "contents differ from the SHA-256"),
    "missing_rank_file": ("rng_rank1.pt", Path.unlink, "missing"),
    "missing_marker": (COMPLETE, Path.unlink, "missing (the save did not complete)"),
}


@pytest.fixture
def copied_run(workdir, dvae_dir, tmp_path):
    """(the finished ZeRO-2 run, its copy to damage)."""
    return copied_zero2_run(workdir, dvae_dir, tmp_path / "run")


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_the_marker_records_every_files_size_and_sha256(copied_run):
    _, run = copied_run
    folder = run / "checkpoints" / f"step{STEPS:08d}"
    marker = json.loads((folder / COMPLETE).read_text())
    names = sorted(p.name for p in folder.iterdir() if p.name != COMPLETE)
    assert sorted(marker["files"]) == names and MODEL_STATES in names and "rng_rank1.pt" in names
    for name in names:  # the two ranks hashed half the files each; all are right
        data = (folder / name).read_bytes()  # under 1 GiB: one piece
        assert marker["files"][name] == {"size": len(data), "sha256": [hashlib.sha256(data).hexdigest()]}
    assert marker["format"] == FORMAT and marker["step"] == STEPS  # the client state is kept beside


def test_large_files_are_hashed_in_pieces_and_a_change_is_located(tmp_path, monkeypatch):
    """Pieces of PIECE bytes (1 GiB; 1000 here), hashed by the ranks between them: a 24 GB model
    file costs one rank 24 pieces' time no more. A changed byte is reported with its piece."""
    monkeypatch.setattr(integrity, "PIECE", 1000)
    folder = tmp_path / "checkpoints" / "step00000001"
    folder.mkdir(parents=True)
    (folder / "big.pt").write_bytes(bytes(range(256)) * 10)  # 2560 bytes: 3 pieces
    (folder / "small.pt").write_bytes(b"x" * 10)
    files = integrity.manifest(folder)
    data = (folder / "big.pt").read_bytes()
    assert files["big.pt"] == {"size": 2560, "sha256": [hashlib.sha256(data[i : i + 1000]).hexdigest() for i in
                                                        (0, 1000, 2000)]}  # fmt: skip
    (folder / COMPLETE).write_text(json.dumps({"step": 1, "format": FORMAT, "files": files}))
    assert Checkpointer(folder.parent, rank=0, keep=1).verify("step00000001") == []
    flip_byte(folder / "big.pt")  # byte 1280: the second piece
    [problem] = Checkpointer(folder.parent, rank=0, keep=1).verify("step00000001")
    assert problem.endswith("big.pt: contents differ from the SHA-256 recorded when saved (bytes 1000 to 2000)")


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_newest_checkpoint_is_named_and_stepped_over(copied_run, damage):
    _, run = copied_run
    name, harm, report = DAMAGE[damage]
    ckpts = run / "checkpoints"
    harm(ckpts / f"step{STEPS:08d}" / name)
    tag, skipped = Checkpointer(ckpts, rank=0, keep=2).newest_intact()
    assert tag == "step00000004"
    [(bad, problems)] = skipped
    assert bad == f"step{STEPS:08d}" and len(problems) == 1
    assert name in problems[0] and report in problems[0], problems


def test_no_intact_checkpoint_stops_with_what_was_checked_and_deletes_nothing(copied_run):
    _, run = copied_run
    ckpts = run / "checkpoints"
    flip_byte(ckpts / f"step{STEPS:08d}" / MODEL_STATES)
    truncate(ckpts / "step00000004" / "rng_rank0.pt")
    before = listing(run)
    with pytest.raises(CheckpointError) as err:
        Checkpointer(ckpts, rank=0, keep=2).newest_intact()
    message = str(err.value)
    assert f"step{STEPS:08d}/{MODEL_STATES}: contents differ" in message
    assert "step00000004/rng_rank0.pt: " in message and "Nothing was moved or deleted" in message
    assert listing(run) == before


def test_a_checkpoint_of_a_newer_format_is_refused_by_name(copied_run):
    _, run = copied_run
    marker = run / "checkpoints" / f"step{STEPS:08d}" / COMPLETE
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": FORMAT + 1}))
    with pytest.raises(CheckpointError, match=f"step{STEPS:08d}: checkpoint format {FORMAT + 1}, written by a newer"):
        Checkpointer(run / "checkpoints", rank=0, keep=2).newest_intact()


def test_resume_loads_the_newest_intact_checkpoint_and_continues_exactly(copied_run, dvae_dir, workdir):
    """One flipped byte in the newest checkpoint's model states (what --resume used to load without
    a word): on 2 ranks the run names the file, resumes from step 4, counts the skip in metrics.jsonl,
    moves the damaged folder aside, and its losses equal the uninterrupted run's. With
    --keep-checkpoints 1 the intact step-4 checkpoint is deleted only once the new step 6 is complete."""
    ref, run = copied_run
    ckpts = run / "checkpoints"
    flip_byte(ckpts / f"step{STEPS:08d}" / MODEL_STATES)
    cfg = ds_config(workdir, 2, reduce_scatter=False)  # the zero2 run's
    proc = launch("train_dalle.py", *train_args(dvae_dir, run, cfg, "--resume", "--keep-checkpoints", 1))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"step{STEPS:08d}/{MODEL_STATES}: contents differ from the SHA-256 recorded when saved" in proc.stdout
    assert "--resume: step00000004 verified" in proc.stdout, proc.stdout
    assert_resumed(run)
    torch.testing.assert_close(torch.tensor(losses(run)), torch.tensor(losses(ref)), rtol=1e-6, atol=1e-6)
    assert [row["checkpoints_skipped"] for row in metrics(run)] == [0] * 4 + [1] * (STEPS - 4)
    assert (ckpts / "set_aside" / f"step{STEPS:08d}" / MODEL_STATES).is_file()
    assert sorted(p.name for p in ckpts.glob("step*")) == [f"step{STEPS:08d}"]
    assert (ckpts / "latest").read_text() == f"step{STEPS:08d}"
    tag, skipped = Checkpointer(ckpts, rank=0, keep=1).newest_intact()
    assert (tag, skipped) == (f"step{STEPS:08d}", [])
