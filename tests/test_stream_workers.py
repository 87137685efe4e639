"""The stream's worker processes live for the whole run: the same processes serve every epoch, and
every epoch still delivers each example once, resumes exactly and starts whole after one that another
rank cut short."""

import json
import os
from collections import defaultdict

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from test_data import numbered_shards

from dalle_ds.data import DataConfig, StreamLoader


def worker_pid(captions: list[str], key: tuple[int, ...]) -> torch.Tensor:
    """A caption encoder that tags each batch with the process that made it."""
    return torch.full((len(captions), 1), os.getpid())


def by_epoch(loader: StreamLoader, batches: int | None = None) -> list[tuple[int, list[str], int]]:
    """(epoch, captions, worker pid) of the loader's batches: all of them, or the first ``batches``."""
    out = []
    for batch in loader:
        out.append((loader.epoch, batch["caption"], int(batch["text"][0, 0])))
        if len(out) == batches:
            break
    return out


def config(root, seed=0) -> DataConfig:
    return DataConfig(str(root), image_size=16, shuffle_buffer=3, seed=seed, caption_encoder=worker_pid)


def test_the_same_workers_serve_every_epoch_and_each_epoch_delivers_every_example_once(tmp_path):
    numbered_shards(tmp_path / "d", [5, 4, 6, 3])
    got = by_epoch(StreamLoader(config(tmp_path / "d"), batch_size=1, num_workers=2, epochs=3))
    captions, pids = defaultdict(list), defaultdict(set)
    for epoch, batch, pid in got:
        captions[epoch] += batch
        pids[epoch].add(pid)
    everything = sorted(f"sample number {i}" for i in range(18))
    assert sorted(captions) == [0, 1, 2]
    assert all(sorted(captions[e]) == everything for e in range(3))
    assert captions[0] != captions[1] != captions[2]  # each epoch its own shard order and shuffles
    assert len(pids[0]) == 2 and os.getpid() not in pids[0]
    assert pids[0] == pids[1] == pids[2]  # no worker was started again


@pytest.mark.parametrize("cut", ["mid_first", "at_boundary", "mid_second"])
def test_resume_anywhere_in_two_epochs_continues_the_same_stream(tmp_path, cut):
    numbered_shards(tmp_path / "d", [7, 9, 6, 8])
    cfg = config(tmp_path / "d", seed=3)
    whole = [(e, c) for e, c, _ in by_epoch(StreamLoader(cfg, batch_size=2, num_workers=2, epochs=2))]
    first = sum(1 for e, _ in whole if e == 0)
    stop = {"mid_first": 3, "at_boundary": first, "mid_second": first + 3}[cut]
    loader = StreamLoader(cfg, batch_size=2, num_workers=2, epochs=2)
    head = [(e, c) for e, c, _ in by_epoch(loader, stop)]
    state = json.loads(json.dumps(loader.state_dict()))  # as stored in a checkpoint
    resumed = StreamLoader(cfg, batch_size=2, num_workers=2, epochs=2)
    resumed.load_state_dict(state)
    tail = [(e, c) for e, c, _ in by_epoch(resumed)]
    assert head + tail == whole


def _cut_short(rank, world, port, root, out):
    mp.set_start_method("fork", force=True)  # data workers forked as under the launcher, not spawned (~6 s each)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loader = StreamLoader(config(root), batch_size=1, rank=rank, world=world, num_workers=2, epochs=2)
    out[rank] = [(e, c) for e, c, _ in by_epoch(loader)]
    dist.destroy_process_group()


def test_an_epoch_cut_short_by_another_rank_leaves_the_next_one_whole(tmp_path):
    """Uneven shards: the rank with less data ends both epochs early for the other, whose workers
    still hold batches of epoch 0 when epoch 1 starts. Those are dropped: its epoch 1 is the start
    of the epoch-1 stream a fresh loader gives."""
    numbered_shards(tmp_path / "d", [20, 1, 1, 1])  # one rank reads the big shard, the other 2 examples
    out = mp.Manager().dict()
    mp.spawn(_cut_short, args=(2, free_port(), str(tmp_path / "d"), out), nprocs=2, join=True)
    for rank in range(2):
        got = [c for e, c in out[rank] if e == 1]
        fresh = StreamLoader(config(tmp_path / "d"), batch_size=1, rank=rank, world=2, num_workers=2, epochs=2)
        fresh.load_state_dict({"epoch": 1, "slots": {}, "past": {}})
        assert got == [c for _, c, _ in by_epoch(fresh, len(got))]
    assert [e for e, _ in out[0]] == [e for e, _ in out[1]]  # the ranks step through epochs together
    assert [e for e, _ in out[0]] == [0, 0, 1, 1]  # both epochs end after the short rank's 2 batches
