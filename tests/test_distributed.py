"""dalle_ds.distributed.collectives: the one module that issues collectives, with device-correct groups.

The launcher test records every torch.distributed call that dalle_ds code makes during real
2-rank training runs (tests/launch_env/collective_recorder.py) and checks each against the rules a
GPU cluster imposes: an NCCL group takes only CUDA tensors, so device tensors must be on the
engine's device and host-side bookkeeping (flags, counters, Python objects, barriers) must go to a
group with a CPU backend."""

import json
from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
from shared_runs import stream_powersgd_run, vq_dvae_run

from dalle_ds.distributed import collectives as dd
from dalle_ds.distributed import process_group

DEVICE_FUNCTIONS = {"all_reduce", "broadcast", "reduce_scatter", "all_gather_into", "new_group"}
HOST_FUNCTIONS = {"host_all_reduce", "all_gather_object", "barrier", "destroy"}


def test_backend_pairs_the_accelerator_with_gloo_for_cpu_tensors():
    assert process_group.backend_for("cuda", "nccl") == "cuda:nccl,cpu:gloo"
    assert process_group.backend_for("xpu", "ccl") == "xpu:ccl,cpu:gloo"
    assert process_group.backend_for("cpu", "gloo") == "gloo"


class _FakeCuda:
    def device_name(self):
        return "cuda"

    def communication_backend_name(self):
        return "nccl"

    def set_device(self, index):
        self.device = index


def test_init_on_a_gpu_asks_for_nccl_plus_gloo_and_sets_the_device(monkeypatch):
    fake = _FakeCuda()
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("DALLE_DS_DIST_BACKEND", raising=False)
    with (
        mock.patch("deepspeed.accelerator.get_accelerator", return_value=fake),
        mock.patch("deepspeed.init_distributed") as init,
        mock.patch.object(dd, "_device_types", return_value={"cuda", "cpu"}),
    ):
        process_group.init_distributed()
    assert init.call_args.kwargs["dist_backend"] == "cuda:nccl,cpu:gloo"
    assert fake.device == 3
    assert dd._HOST_GROUP is None  # the default group takes CPU tensors itself


def test_a_default_group_without_cpu_backend_gets_a_gloo_group_for_bookkeeping(monkeypatch):
    monkeypatch.setenv("DALLE_DS_DIST_BACKEND", "nccl")  # what a user may force
    sentinel = object()
    with (
        mock.patch("deepspeed.accelerator.get_accelerator", return_value=_FakeCuda()),
        mock.patch("deepspeed.init_distributed") as init,
        mock.patch.object(dd, "_device_types", return_value={"cuda"}),
        mock.patch.object(dd.dist, "new_group", return_value=sentinel) as new_group,
        mock.patch.object(dd.dist, "is_initialized", return_value=True),
        mock.patch.object(dd.dist, "get_backend_config", return_value="cuda:nccl"),
    ):
        process_group.init_distributed()
        assert init.call_args.kwargs["dist_backend"] == "nccl"
        assert new_group.call_args.kwargs == {"backend": "gloo"}
        assert dd.host_group() is sentinel
        dd._HOST_GROUP = None  # a group nobody made: the error says what to do
        with pytest.raises(RuntimeError, match=r'no CPU backend .* "cuda:nccl,cpu:gloo"'):
            dd.host_group()


def test_host_helpers_without_a_process_group():
    assert dd.host_all_reduce([1.0, 2.0], op="max") == [1.0, 2.0]
    assert dd.all_gather_object({"a": 1}) == [{"a": 1}]


def _records(folder: Path) -> list[dict]:
    rows = []
    for path in sorted(folder.glob("rank*.jsonl")):
        rows += [json.loads(line) for line in path.read_text().splitlines()]
    return rows


def test_every_collective_of_a_training_run_goes_through_one_module_on_the_right_device(workdir, dvae_dir, shards):
    """The shared runs (streamed DALL-E with PowerSGD, the VQ dVAE) recorded every torch.distributed
    call dalle_ds made in each rank."""
    dalle, dvae = stream_powersgd_run(workdir, dvae_dir, shards), vq_dvae_run(workdir)
    rows = _records(dalle / "collectives") + _records(dvae / "collectives")
    assert rows, "nothing recorded"
    for row in rows:
        assert row["caller"].split(":")[0].endswith("dalle_ds/distributed/collectives.py"), row  # one module
        assert set(row["devices"]) <= set(row["group_devices"]), row  # the group's backends take them
        if row["function"] in HOST_FUNCTIONS:
            assert row["devices"] in ([], ["cpu"]) and "cpu" in row["group_devices"], row
        else:
            assert row["function"] in DEVICE_FUNCTIONS, row
            assert row["devices"] in ([], ["cpu"]), row  # the engine's device on this machine
        if row["object"]:
            assert "cpu" in row["group_devices"], row
    # Every kind of traffic was seen: the stream's epoch flag, peak memory, sync checks, PowerSGD's
    # gradient reduction and the codebook statistics.
    origins = Counter(Path(row["origin"].split(":")[0]).name for row in rows)
    assert {"stream.py", "trainer.py", "metrics.py", "checkpointing.py", "powersgd.py", "dvae.py"} <= set(origins), (
        origins
    )
    functions = {(Path(r["origin"].split(":")[0]).name, r["function"]) for r in rows}
    assert ("stream.py", "host_all_reduce") in functions and ("powersgd.py", "all_reduce") in functions
    assert ("dvae.py", "all_reduce") in functions and ("metrics.py", "all_gather_object") in functions
