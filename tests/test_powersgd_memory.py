"""PowerSGD's memory: residuals in error_dtype, what the dry run plans equals what the hook holds
and sends (flat, and hierarchical on a 2 nodes x 2 ranks topology), exact resume of 16-bit
residuals, the one-node fallback of hierarchical mode."""

import functools
import io
import os
import weakref

import torch
import torch.distributed as dist
from test_powersgd import run_ranks
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dalle_ds import DALLE, get_preset
from dalle_ds.distributed.powersgd import PowerSGD, PowerSGDConfig, build_comm_hook
from dalle_ds.planning.layout import EngineSettings, Layout
from dalle_ds.planning.model_shape import model_shape
from dalle_ds.planning.powersgd_plan import powersgd_collectives, powersgd_memory

HOOK = {"type": "powersgd", "rank": 4, "start_iter": 0, "min_compression_rate": 2, "dtype": "bf16"}
BUCKET = 100_000  # elements: dalle-tiny's gradients fill several buckets


def ds_config(hierarchical: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 2, "reduce_scatter": False, "reduce_bucket_size": BUCKET},
        "communication_hook": {**HOOK, "hierarchical": hierarchical},
    }


@functools.cache
def tiny_shapes() -> list[tuple[str, torch.Size]]:
    return [(name, p.shape) for name, p in DALLE(get_preset("dalle-tiny")).named_parameters()]


def buckets(step: int, rank: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Random bf16 gradients of dalle-tiny's parameters, in buckets of BUCKET elements filled in
    reverse parameter order as DeepSpeed's ZeRO-2 fills them (a larger parameter comes alone)."""
    g = torch.Generator().manual_seed(100 * step + rank)
    out, current, size = [], [], 0
    for name, shape in reversed(tiny_shapes()):
        if current and size + shape.numel() > BUCKET:
            out.append(current)
            current, size = [], 0
        current.append((name, torch.randn(shape, generator=g).bfloat16()))
        size += shape.numel()
    return out + [current]


def run_step(hook: PowerSGD, step: int, rank: int) -> list[torch.Tensor]:
    reduced = []
    for bucket in buckets(step, rank):
        hook.reduce(bucket)
        reduced += [g for _, g in bucket]
    hook.step()
    return reduced


def planned(hierarchical: bool, nodes: int, gpus_per_node: int):
    cfg = ds_config(hierarchical)
    layout = Layout(nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory=2**40, micro_batch=1)
    e = EngineSettings.from_ds_config(cfg, layout, "test")
    psgd = PowerSGDConfig.from_section(cfg["communication_hook"])
    shape = model_shape(get_preset("dalle-tiny"))
    payloads = {c.what: c.payload * c.count for c in powersgd_collectives(shape, e, psgd, layout)}
    kinds = {"plain": "uncompressed gradients (PowerSGD hook)", "P": "PowerSGD P", "Q": "PowerSGD Q"}
    return powersgd_memory(shape, e, psgd, layout)["powersgd_state"], {k: payloads[w] for k, w in kinds.items()}


def held(hook: PowerSGD) -> int:
    return sum(t.nbytes for t in (*hook.errors.values(), *hook.qs.values()))


def test_flat_hook_holds_and_sends_what_the_plan_says(single_process_group):
    hook = build_comm_hook(ds_config(False)["communication_hook"])
    hook.train_dtype = torch.bfloat16  # as attach_comm_hook sets it on a bf16 engine
    run_step(hook, 0, 0)
    assert {e.dtype for e in hook.errors.values()} == {torch.bfloat16}  # error_dtype "auto" under bf16
    assert {q.dtype for q in hook.qs.values()} == {torch.float32}
    state, payloads = planned(False, 1, 2)
    assert held(hook) == state and hook.bytes_by_kind == payloads
    assert payloads["P"] > 0 and payloads["plain"] > 0


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages allocated inside the mode and still referenced; their peak."""

    def __init__(self):
        super().__init__()
        self.refs, self.size, self.now, self.peak = {}, {}, 0, 0

    def _drop(self, key):
        self.refs[key] -= 1
        if not self.refs[key]:
            self.now -= self.size.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if torch.is_tensor(t)}
        for t in (t for t in tree_flatten(out)[0] if torch.is_tensor(t)):
            key = t.untyped_storage().data_ptr()
            if key in self.refs:  # a view of a storage allocated in here
                self.refs[key] += 1
            elif key in inputs or func.is_view:  # in place, or a view of a storage from outside
                continue
            else:
                self.refs[key], self.size[key] = 1, t.untyped_storage().nbytes()
                self.now += self.size[key]
                self.peak = max(self.peak, self.now)
            weakref.finalize(t, self._drop, key)
        return out


def test_a_bucket_holds_one_matrix_at_a_time_within_the_planned_in_flight_bytes(single_process_group):
    cfg = ds_config(False)
    hook = build_comm_hook(cfg["communication_hook"])
    hook.train_dtype = torch.bfloat16
    run_step(hook, 0, 0)  # residuals and Q's exist: the steady state
    layout = Layout(nodes=1, gpus_per_node=2, gpu_memory=2**40, micro_batch=1)
    e, psgd = EngineSettings.from_ds_config(cfg, layout, "test"), PowerSGDConfig.from_section(cfg["communication_hook"])
    in_flight = powersgd_memory(model_shape(get_preset("dalle-tiny")), e, psgd, layout)["powersgd_in_flight"]
    peaks = []
    for bucket in buckets(1, 0):
        matrices = [g.numel() * 4 for _, g in bucket if hook._compressible(g)]
        with LiveBytes() as live:
            hook.reduce(bucket)
        peaks.append(live.peak)
        # fp32 M and approximation of one matrix at a time (P, Q and the plain part are small beside
        # them), where stacking the bucket's matrices held two fp32 copies of all of them
        assert 2 * max(matrices) <= live.peak < 2 * max(matrices) + sum(matrices) // 4, (live.peak, matrices)
    largest = max(shape.numel() for _, shape in tiny_shapes() if len(shape) == 2) * 4
    assert max(peaks) <= in_flight < 2 * max(peaks) and 2 * largest < in_flight  # the plan: a bound, not far off


def _hierarchical_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    hook = build_comm_hook(ds_config(True)["communication_hook"])
    hook.train_dtype = torch.bfloat16
    run_step(hook, 0, rank)
    shards = {key: e.shape for key, e in hook.errors.items()}
    out[rank] = (held(hook), dict(hook.bytes_by_kind), shards)
    dist.destroy_process_group()


def test_hierarchical_hook_on_two_nodes_holds_residuals_of_its_shard_only_as_planned():
    out = run_ranks(_hierarchical_worker, 4)
    state, payloads = planned(True, 2, 2)
    held_bytes, sent, shards = out[0]  # local rank 0 holds the largest shards: what the plan counts
    assert held_bytes == state and sent == payloads
    full = dict(tiny_shapes())
    for rank in range(4):
        for (name, local_rank), shape in out[rank][2].items():
            assert local_rank == rank % 2  # a residual per compressed row shard this rank owns, no other
            rows = torch.empty(full[name]).reshape(full[name][0], -1).tensor_split(2)[local_rank]
            assert shape == rows.shape
    assert out[1][0] <= state  # local rank 1: shards of at most as many rows


def _residual_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {}
    for error_dtype in ("fp32", "bf16"):
        hook = PowerSGD(PowerSGDConfig(rank=2, start_iter=0, error_dtype=error_dtype))
        steps = [run_step(hook, s, rank) for s in range(2)]
        results[error_dtype] = [torch.cat([g.float().flatten() for g in gs if g.ndim == 2]) for gs in steps]
        if error_dtype == "bf16":  # exact resume: 16-bit residuals round-trip a checkpoint bit for bit
            buffer = io.BytesIO()
            torch.save(hook.state_dict(), buffer)
            buffer.seek(0)
            resumed = PowerSGD(hook.config)
            resumed.load_state_dict(torch.load(buffer, weights_only=True))
            results["resumed"] = (run_step(hook, 2, rank), run_step(resumed, 2, rank))
            # a checkpoint written with fp32 residuals loads into the configured dtype
            old = {**hook.state_dict(), "errors": {k: v.float() for k, v in hook.errors.items()}}
            fresh = PowerSGD(hook.config)
            fresh.load_state_dict(old)
            results["cast"] = all(fresh.errors[k].dtype == torch.bfloat16 for k in hook.errors) and all(
                torch.equal(fresh.errors[k], hook.errors[k]) for k in hook.errors
            )
    out[rank] = results
    dist.destroy_process_group()


def test_bf16_residuals_track_fp32_ones_and_resume_exactly():
    out = run_ranks(_residual_worker, 2)[0]
    for fp32, bf16 in zip(out["fp32"], out["bf16"], strict=True):
        assert ((bf16 - fp32).norm() / fp32.norm()).item() < 2e-2
    assert not torch.equal(out["fp32"][1], out["bf16"][1])  # the residuals really were stored in 16 bits
    done, resumed = out["resumed"]
    assert all(torch.equal(a, b) for a, b in zip(done, resumed, strict=True))
    assert out["cast"]


def test_hierarchical_on_one_node_averages_exactly_and_says_so(single_process_group, capsys):
    hook = build_comm_hook({**HOOK, "hierarchical": True})
    assert "hierarchical PowerSGD on one node" in capsys.readouterr().out
    assert hook.config.exact and hook.intra_group is None
    bucket = buckets(0, 0)[0]
    expected = [g.float().clone() for _, g in bucket]
    hook.reduce(bucket)
    assert all(torch.equal(g.float(), e) for (_, g), e in zip(bucket, expected, strict=True))
    assert hook.bytes_by_kind == {"plain": sum(g.numel() for _, g in bucket) * 4, "P": 0, "Q": 0}
    assert hook.errors == {} and hook.qs == {}
