"""PowerSGD: math against PyTorch's DDP hook, full-rank exactness, error feedback, config errors."""

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from dalle_ds.distributed.ds_config import DeepSpeedConfigError, prepare_ds_config
from dalle_ds.distributed.powersgd import CommHookError, PowerSGD, PowerSGDConfig, build_comm_hook

N, M, R = 12, 10, 2


def run_ranks(worker, world: int, *args) -> dict:
    """Run ``worker(rank, world, port, *args, out)`` in ``world`` processes; returns ``out`` (rank -> result)."""
    out = mp.Manager().dict()
    mp.spawn(worker, args=(world, free_port(), *args, out), nprocs=world, join=True)
    return out


def _grad(rank: int, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(N, M, generator=g)


def _worker(rank: int, world: int, port: int, out: dict):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as ref

    # Reference: a real DDP model whose only parameter is one N x M matrix (bias-free Linear).
    torch.manual_seed(0)
    model = torch.nn.Linear(M, N, bias=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    state = ref.PowerSGDState(
        process_group=None,
        matrix_approximation_rank=R,
        start_powerSGD_iter=2,
        min_compression_rate=1,
        use_error_feedback=True,
        warm_start=True,
        orthogonalization_epsilon=0,
        random_seed=0,
    )
    ddp.register_comm_hook(state, ref.powerSGD_hook)
    # Ours, fed the same local gradients; its first Q is the one PyTorch's hook draws.
    ours = PowerSGD(PowerSGDConfig(rank=R, start_iter=2, min_compression_rate=1, warm_start=True))
    rng = np.random.RandomState(0)
    refs, mine = [], []
    for step in range(5):
        x = torch.eye(M)
        target = _grad(rank, step)  # d(sum(W x * G))/dW = G: the local gradient is exactly G
        ddp.zero_grad()
        (ddp(x).T * target).sum().backward()
        refs.append(model.weight.grad.clone())
        if step == 2:  # PyTorch seeds its Q from a RandomState(random_seed) draw, once (warm start)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(rng.randint(1_000_000_000))
                ours.qs["w"] = torch.randn(1, M, R)[0]
        g = target.clone()
        ours.reduce([("w", g)])
        ours.step()
        mine.append(g)
    out[rank] = (
        torch.stack(refs),
        torch.stack(mine),
        torch.stack(list(state.q_memory_dict.values())[0:1]),
        ours.qs["w"].clone(),
        ours.last_step_bytes,
    )
    dist.destroy_process_group()


def test_matches_pytorch_powersgd_hook_on_real_ddp():
    out = run_ranks(_worker, 2)
    ref, mine, ref_q, my_q, (sent, plain) = out[0]
    # Steps 0-1: plain averages; 2-4: compressed with error feedback; all match to fp32 tolerance.
    torch.testing.assert_close(mine, ref, atol=1e-5, rtol=1e-4)
    avg = (torch.stack([_grad(0, s) for s in range(5)]) + torch.stack([_grad(1, s) for s in range(5)])) / 2
    torch.testing.assert_close(mine[:2], avg[:2])
    assert not torch.allclose(mine[2:], avg[2:], atol=1e-3)  # steps 2+ are really compressed
    torch.testing.assert_close(my_q, ref_q.reshape(M, R), atol=1e-5, rtol=1e-4)  # warm-started Q
    torch.testing.assert_close(out[1][1], mine)  # both ranks hold the same averaged gradient
    assert sent == (N + M) * R * 4 and plain == N * M * 4


def _full_rank_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    hook = PowerSGD(
        PowerSGDConfig(rank=M, start_iter=0, min_compression_rate=1, warm_start=False, orthogonalization="householder")
    )
    gs = [_grad(rank, s) for s in range(3)]
    results = []
    for g in gs:
        g = g.clone()
        hook.reduce([("w", g)])
        results.append(g)
    # Error feedback: with rank 1 the running sum of applied updates tracks the sum of true averages.
    low = PowerSGD(PowerSGDConfig(rank=1, start_iter=0, min_compression_rate=1, warm_start=True))
    applied = torch.zeros(N, M)
    for s in range(60):
        g = _grad(rank, 100 + s % 3).clone()
        low.reduce([("w", g)])
        applied += g
    out[rank] = (torch.stack(results), applied)
    dist.destroy_process_group()


def test_full_rank_equals_the_plain_average_and_error_feedback_tracks_the_sum():
    out = run_ranks(_full_rank_worker, 2)
    results, applied = out[0]
    avg = torch.stack([(_grad(0, s) + _grad(1, s)) / 2 for s in range(3)])
    torch.testing.assert_close(results, avg, atol=1e-5, rtol=1e-5)
    true_sum = sum((_grad(0, 100 + s % 3) + _grad(1, 100 + s % 3)) / 2 for s in range(60))
    # Without feedback a rank-1 approximation loses most of each gradient; with it, what is left
    # over is one step's residual, small against the sum of 60 steps.
    assert (applied - true_sum).norm() < 0.1 * true_sum.norm()


# Tensors for the hierarchical tests: rows split evenly, unevenly, fewer rows than local ranks, a vector.
SHAPES = {"w": (12, 10), "odd": (5, 7), "thin": (1, 10), "b": (7,)}


def _hgrads(rank: int, step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {k: torch.randn(shape, generator=g) for k, shape in SHAPES.items()}


def _hierarchical_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    base = {"type": "powersgd", "hierarchical": True, "start_iter": 0, "dtype": "fp32"}
    exact = build_comm_hook({**base, "exact": True})
    results = {"exact": _hgrads(rank, 0)}
    exact.reduce(list(results["exact"].items()))
    low = build_comm_hook({**base, "rank": 1, "min_compression_rate": 1})
    grads = _hgrads(rank, 0)
    low.reduce(list(grads.items()))
    results["rank1"] = grads
    half = build_comm_hook({**base, "rank": 1, "min_compression_rate": 1, "dtype": "fp16"})
    half.reduce(list(_hgrads(rank, 0).items()))
    out[rank] = (results, low.last_step_bytes, half.last_step_bytes)
    dist.destroy_process_group()


def test_hierarchical_2x2_reduces_exactly_in_node_and_compresses_row_shards_across_nodes():
    world = 4
    out = run_ranks(_hierarchical_worker, world)
    mean = {k: sum(_hgrads(r, 0)[k] for r in range(world)) / world for k in SHAPES}
    for rank in range(world):
        results = out[rank][0]
        for k in SHAPES:
            torch.testing.assert_close(results["exact"][k], mean[k], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(results["rank1"][k], out[0][0]["rank1"][k], atol=0, rtol=0)
    # Rank 1 compresses "w" as two 6 x 10 row shards, one per local rank: each shard of the result
    # is the mean's shard projected onto one direction (P P^T M), so rank 1 and nothing lost there.
    w = out[0][0]["rank1"]["w"]
    for shard, target in zip(w.split(6), mean["w"].split(6), strict=True):
        assert torch.linalg.matrix_rank(shard).item() == 1
        u = torch.linalg.svd(shard)[0][:, :1]
        torch.testing.assert_close(u @ (u.T @ target), shard, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(w, mean["w"], atol=1e-2)
    # Across nodes, local rank 0 sends only its own shards: "thin" (1 x 10, too small to compress)
    # and 4 of "b" plain, P and Q of its 6 x 10 rows of "w" and 3 x 7 rows of "odd" at rank 1.
    sent, plain = out[0][1]
    assert sent == (10 + 4 + (6 + 10) + (3 + 7)) * 4
    assert out[0][2][0] == (10 + 4) * 4 + ((6 + 10) + (3 + 7)) * 2  # P and Q in fp16, the rest fp32
    assert plain == sum(math.prod(s) for s in SHAPES.values()) * 4


def test_config_errors_name_the_key():
    with pytest.raises(CommHookError, match=r"communication_hook.rank=0"):
        build_comm_hook({"type": "powersgd", "rank": 0})
    with pytest.raises(CommHookError, match=r"unknown key\(s\) \['ranks'\]"):
        build_comm_hook({"type": "powersgd", "ranks": 4})
    with pytest.raises(CommHookError, match=r"type='topk': unknown; registered: \['powersgd'\]"):
        build_comm_hook({"type": "topk"})
    with pytest.raises(CommHookError, match="dtype='fp8'"):
        PowerSGDConfig(dtype="fp8")
    base = {"train_micro_batch_size_per_gpu": 1, "communication_hook": {"type": "powersgd"}}
    with pytest.raises(DeepSpeedConfigError, match="stage=3 is not supported"):
        prepare_ds_config({**base, "zero_optimization": {"stage": 3}}, world_size=2)
    with pytest.raises(DeepSpeedConfigError, match="reduce_scatter=false"):
        prepare_ds_config({**base, "zero_optimization": {"stage": 2, "reduce_scatter": True}}, world_size=2)
    cfg = prepare_ds_config({**base, "zero_optimization": {"stage": 2}}, world_size=2)
    assert cfg["zero_optimization"]["reduce_scatter"] is False and "communication_hook" not in cfg


# --- fp16: loss scales and overflows -------------------------------------------------------------

SCALES = [1024.0, 512.0, 512.0, 4096.0, 256.0, 2048.0]  # a dynamic loss scale moving both ways


def _fp16_worker(rank, world, port, out):
    """Gradients arrive as fp16 buckets of loss-scaled values, as DeepSpeed's ZeRO 1/2 hands them."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = PowerSGDConfig(rank=2, start_iter=0, min_compression_rate=1, dtype="fp16", orthogonalization="householder")

    def fp16_hook():  # as attach_comm_hook sets it up on an fp16 engine
        hook = PowerSGD(cfg)
        hook.skips_non_finite = True
        return hook

    def run(scales, told):
        hook, applied = fp16_hook(), []
        for step, (scale, say) in enumerate(zip(scales, told, strict=True)):
            g = (_grad(rank, step) * 1e-3 * scale).half()
            hook.reduce([("w", g)], scale=say)
            hook.step()
            applied.append(g.float() / scale)  # what the optimizer applies after unscaling
        return torch.stack(applied)

    constant = run([SCALES[0]] * len(SCALES), [SCALES[0]] * len(SCALES))
    moving = run(SCALES, SCALES)
    unaware = run(SCALES, [1.0] * len(SCALES))  # a hook that keeps residuals in scaled units

    # Overflows mid-run: no exception, the engine sees non-finite values, nothing is kept. Step 2
    # overflows in the matrix itself; step 3 in a bias of the same bucket while the matrix's P and Q
    # stay finite (its new residual must be dropped too, since the engine skips the whole step).
    hook, twin = fp16_hook(), fp16_hook()
    for step in range(2):
        for h in (hook, twin):
            g = (_grad(rank, step) * 1e-3 * 1024).half()
            h.reduce([("w", g), ("b", torch.ones(3, dtype=torch.half))], scale=1024)
            h.step()
    before = {k: v.clone() for k, v in hook.errors.items()}
    seen, kept = [], []
    for step, where in ((2, "w"), (3, "b")):
        bad = {"w": (_grad(rank, step) * 1e-3 * 1024).half(), "b": torch.ones(3, dtype=torch.half)}
        if rank == 1:
            bad[where].view(-1)[0] = float("inf")
        hook.reduce(list(bad.items()), scale=1024)
        seen.append(not bool(torch.isfinite(bad[where]).all()))
        hook.step(skipped=True)  # what the engine reports after its overflow check
        kept.append(all(torch.equal(before[k], hook.errors[k]) for k in before))
    after = []
    for h in (hook, twin):  # the next step, at a lower scale, is as if the overflows never came
        g = (_grad(rank, 4) * 1e-3 * 256).half()
        h.reduce([("w", g), ("b", torch.ones(3, dtype=torch.half))], scale=256)
        h.step()
        after.append(g.float())

    # An engine that applies every update (bf16/fp32): a non-finite P/Q is an error, not a skip.
    plain = PowerSGD(cfg)
    g = _grad(rank, 0).half()
    if rank == 0:
        g[1, 1] = float("nan")
    plain.reduce([("w", g)])
    try:
        plain.step()
        raised = False
    except FloatingPointError:
        raised = True
    out[rank] = (constant, moving, unaware, all(seen), all(kept), hook.skipped, after[0], after[1], raised)
    dist.destroy_process_group()


def test_fp16_loss_scale_changes_do_not_change_the_update_and_overflows_are_skipped():
    out = run_ranks(_fp16_worker, 2)
    constant, moving, unaware, overflow_seen, kept, skipped, after, twin, raised = out[0]
    assert not torch.allclose(constant[1:], torch.stack([(_grad(0, s) + _grad(1, s)) / 2e3 for s in range(1, 6)]))
    rel = ((moving - constant).norm() / constant.norm()).item()
    assert rel < 5e-3, rel  # fp16 rounding of the buckets at other scales, nothing more
    wrong = ((unaware - constant).norm() / constant.norm()).item()
    assert wrong > 0.1, wrong  # residuals carried across a scale change in scaled units
    assert overflow_seen and kept and skipped == 2
    assert out[1][3] and out[1][4]  # rank 0 had finite input: it saw the overflows through the reduce
    torch.testing.assert_close(after, twin, rtol=0, atol=0)
    assert raised and out[1][8]  # on both ranks: the reduced P is non-finite everywhere


@pytest.mark.parametrize("grad_accum_dtype", [None, "fp32"])
def test_bf16_at_zero1_hooks_the_zero_optimizer_unless_gradients_accumulate_in_fp32(
    single_process_group, grad_accum_dtype
):
    """DeepSpeed 0.19.8 gives bf16 at ZeRO-1 its bucketed ZeRO optimizer, which the hook takes over
    (compressing, bf16 residuals); only with fp32 gradient accumulation does it pick BF16_Optimizer,
    which has no buckets: refused, naming the setting."""
    from dalle_ds import DALLE, DalleConfig
    from dalle_ds.distributed import ds_adapter

    torch.manual_seed(0)
    model = DALLE(DalleConfig.from_name("dalle-tiny", n_layers=2))
    section = {"type": "powersgd", "rank": 2, "start_iter": 0, "min_compression_rate": 1.0}
    raw = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 1, "reduce_scatter": False}}
    if grad_accum_dtype:
        raw["data_types"] = {"grad_accum_dtype": grad_accum_dtype}
    ds = prepare_ds_config(raw, world_size=1, micro_batch_size=2, gradient_accumulation_steps=1)
    engine, _, _ = ds_adapter.build_engine(model, ds, torch.optim.AdamW(model.parameters(), lr=1e-3))
    hook = build_comm_hook(section)
    if grad_accum_dtype:
        with pytest.raises(CommHookError, match="grad_accum_dtype"):
            ds_adapter.attach_comm_hook(engine, hook)
        return
    ds_adapter.attach_comm_hook(engine, hook)
    g = torch.Generator().manual_seed(1)
    text, codes = torch.randint(0, 256, (2, 16), generator=g), torch.randint(0, 128, (2, 64), generator=g)
    ds_adapter.backward(engine, engine(text, image_codes=codes).loss)
    engine.step()
    hook.step()
    assert hook.bytes_by_kind["P"] > 0 and hook.bytes_by_kind["Q"] > 0
    assert {e.dtype for e in hook.errors.values()} == {torch.bfloat16}
