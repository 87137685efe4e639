"""Per-resblock gradient scaling (dalle_ds.training.grad_scaling): exactness in fp32, closeness in
fp16, non-finite handling (flags, back-off, cooldown, clamps, skipped steps), gradient accumulation,
activation checkpointing, checkpoints and the config section. All in-process on the CPU."""

import copy
import io
import json
import math

import pytest
import torch
import torch.utils.checkpoint

from dalle_ds import DALLE, DalleConfig
from dalle_ds.bench.grad_scaling.fidelity import segment_of  # the parameter -> res block map the benchmark uses
from dalle_ds.distributed import ds_adapter
from dalle_ds.training.grad_scaling import (
    GradScalingConfigError,
    GradScalingError,
    ResblockScalingConfig,
    install_resblock_scaling,
    skipping_step,
)

FP32 = ResblockScalingConfig(compute_dtype="float32")
GROWTH = 2 ** (1 / 1000)


def tiny(n_layers=2, **overrides):
    return DALLE(DalleConfig.from_name("dalle-tiny", n_layers=n_layers, **overrides))


def batch(n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 16), generator=g), torch.randint(0, 128, (n, 64), generator=g)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def backward(model, data=None):
    model.zero_grad(set_to_none=True)
    model(*(data or batch())).loss.backward()
    return grads(model)


def assert_rounding_close(got, expected):
    """Equal up to fp32 rounding (relative to each tensor's largest entry: near-zero entries differ)."""
    assert got.keys() == expected.keys() and len(got) > 10
    for name in expected:
        atol = 1e-6 * expected[name].abs().max().item()
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=atol, msg=name)


class Injector:
    """Puts +inf into one entry of the gradient of ``module``'s output while ``armed``."""

    def __init__(self, module):
        self.armed = False
        module.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if self.armed and out.requires_grad:

            def poison(g):
                g = g.clone()
                g.view(-1)[0] = float("inf")
                return g

            out.register_hook(poison)


def odd_scales(scaler):
    for i, name in enumerate(scaler.scales):
        scaler.set_scale(name, 129.3 * 7.77**i)  # all different, none a power of two, within the bounds


# --- 1. exactness in fp32 ---------------------------------------------------------------------------


def test_scaling_in_fp32_leaves_gradients_unchanged():
    ref = tiny(3)
    model = copy.deepcopy(ref)
    scaler = install_resblock_scaling(model, FP32)
    odd_scales(scaler)
    assert len(set(scaler.scales.values())) == 6 and min(scaler.scales.values()) > 128
    expected, got = backward(ref), backward(model)
    assert_rounding_close(got, expected)
    assert not scaler.check()
    scaler.remove()  # hooks and wrappers gone: the model is the plain model again
    assert "forward" not in vars(model.blocks[0])
    assert_rounding_close(backward(model), expected)


def test_segments_cover_every_trainable_parameter_once():
    model = tiny(2)
    scaler = install_resblock_scaling(model, FP32)
    names = [s.name for s in scaler.segments]
    assert names == ["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp", "rest"]
    by_id = {id(p): s.name for s in scaler.segments for p in s.params}
    for name, p in model.named_parameters():
        assert by_id[id(p)] == segment_of(name), name


# --- 2. fp16 against the fp32 reference -------------------------------------------------------------


def test_fp16_gradients_match_fp32_per_block():
    ref = tiny(4)
    model = copy.deepcopy(ref)
    scaler = install_resblock_scaling(model, ResblockScalingConfig())
    expected, got = backward(ref), backward(model)
    assert not scaler.check()
    assert all(g.dtype == torch.float32 for g in got.values())
    for seg in [s.name for s in scaler.segments]:
        names = [n for n in expected if segment_of(n) == seg]
        a = torch.cat([expected[n].flatten() for n in names])
        b = torch.cat([got[n].flatten() for n in names])
        cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        assert cos > 0.999, (seg, cos)
        assert 0.98 < b.norm().item() / a.norm().item() < 1.02, seg  # unscaled: same magnitude


def test_without_the_scales_small_fp16_gradients_underflow():
    """Gradients 1e4 x smaller (a large batch, late training): scaled by 2**13 they survive the fp16
    branches; with every scale at 1 they underflow. This also checks that the scale is applied before
    the gradient is cast to fp16 at the branch output."""
    ref = tiny(2)

    def cosines(power):
        model = copy.deepcopy(ref)
        config = ResblockScalingConfig(initial_scale_power=power, min_scale_power=0)
        scaler = install_resblock_scaling(model, config)
        model(*batch()).loss.mul(1e-4).backward()
        assert not scaler.check()
        got = grads(model)
        a = torch.cat([expected[n].flatten() for n in got if n.startswith("blocks.0.")])
        b = torch.cat([got[n].flatten() for n in got if n.startswith("blocks.0.")])
        return torch.nn.functional.cosine_similarity(a, b, dim=0).item()

    ref(*batch()).loss.mul(1e-4).backward()
    expected = grads(ref)
    assert cosines(13) > 0.9999
    assert cosines(0) < 0.95


def test_blocks_run_in_fp16_and_the_stream_and_logits_stay_fp32():
    model = tiny(2)
    install_resblock_scaling(model, ResblockScalingConfig())
    seen = {}

    def record(key):
        def hook(module, args, out):
            seen[key] = out.dtype

        return hook

    model.blocks[0].attn.qkv.register_forward_hook(record("qkv"))
    model.blocks[0].register_forward_hook(record("block"))
    out = model(*batch(), return_logits=True)
    assert seen == {"qkv": torch.float16, "block": torch.float32}
    assert out.image_logits.dtype == torch.float32 and out.loss.dtype == torch.float32


def test_parameters_must_be_fp32():
    with pytest.raises(GradScalingError, match="needs fp32 parameters"):
        install_resblock_scaling(tiny(1).half(), ResblockScalingConfig())
    model = tiny(1)
    install_resblock_scaling(model, ResblockScalingConfig())
    model.blocks[0].mlp.bfloat16()  # what an engine casting the model after installation would do
    with pytest.raises(GradScalingError, match="gradient is torch.bfloat16, expected float32"):
        model.blocks[0].mlp(torch.randn(1, 3, 128, dtype=torch.bfloat16)).sum().backward()


# --- 3. non-finite gradients ------------------------------------------------------------------------


def step(model, scaler, opt, data=None, all_reduce=None):
    opt.zero_grad(set_to_none=True)
    model(*(data or batch())).loss.backward()
    skip = scaler.check(all_reduce=all_reduce)
    with skipping_step(opt, skip) as record:
        opt.step()
    scaler.update()
    assert record.calls == (1 if skip else 0)
    return skip


def snapshot(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}
    return params, state


def assert_same(a, b):
    assert a[0].keys() == b[0].keys() and a[1].keys() == b[1].keys()
    for n in a[0]:
        assert torch.equal(a[0][n], b[0][n]), n
    for pid in a[1]:
        for k in a[1][pid]:
            assert torch.equal(torch.as_tensor(a[1][pid][k]), torch.as_tensor(b[1][pid][k])), k


def test_non_finite_gradient_flags_its_block_backs_off_and_skips_the_step():
    model = tiny(3)
    scaler = install_resblock_scaling(model, ResblockScalingConfig())
    inject = Injector(model.blocks[1].attn.qkv)  # inside the fp16 attention branch of block 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    s0 = 2.0**13
    assert not step(model, scaler, opt)  # a clean step: every scale grows, Adam has state
    assert all(v == pytest.approx(s0 * GROWTH, rel=1e-12) for v in scaler.scales.values())
    before = snapshot(model, opt)
    scales_before = dict(scaler.scales)

    inject.armed = True
    assert step(model, scaler, opt)
    assert scaler.last_nonfinite == ["blocks.1.attn"]
    assert_same(snapshot(model, opt), before)  # parameters, moments and step count untouched
    for name, value in scaler.scales.items():
        expected = scales_before[name] / math.sqrt(2) if name == "blocks.1.attn" else scales_before[name]
        assert value == pytest.approx(expected, rel=1e-12), name
    assert scaler.stats()["grad_scale_skipped"] == 1 and scaler.updates == 2

    inject.armed = False
    assert not step(model, scaler, opt)  # clean again: every scale grows, the update is applied
    for name, value in scaler.scales.items():
        expected = scales_before[name] / (math.sqrt(2) if name == "blocks.1.attn" else 1) * GROWTH
        assert value == pytest.approx(expected, rel=1e-12), name
    assert not torch.equal(model.blocks[0].mlp.fc.weight, before[0]["blocks.0.mlp.fc.weight"])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_flagged_gradients_are_zeroed_not_propagated():
    model = tiny(2)
    scaler = install_resblock_scaling(model, ResblockScalingConfig())
    inject = Injector(model.blocks[1].attn.qkv)
    inject.armed = True
    got = backward(model)
    assert all(torch.isfinite(g).all() for g in got.values())
    assert scaler.check() and scaler.last_nonfinite == ["blocks.1.attn"]
    assert got["blocks.1.attn.qkv.weight"].abs().sum() > 0  # only the non-finite entries are zeroed


def test_back_off_cooldown_is_125_updates_per_block():
    model = tiny(1)
    scaler = install_resblock_scaling(model, ResblockScalingConfig())
    inject = Injector(model.blocks[0].mlp.fc)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def flagged_update():
        inject.armed = True
        assert step(model, scaler, opt)
        inject.armed = False
        assert scaler.last_nonfinite == ["blocks.0.mlp"]

    def clean_updates(n):
        for _ in range(n):  # no flags: check / update alone (no backward needed)
            assert not scaler.check()
            scaler.update()

    flagged_update()  # update 0: backs off
    s = scaler.scales["blocks.0.mlp"]
    assert s == pytest.approx(2.0**13 / math.sqrt(2))
    clean_updates(9)
    flagged_update()  # update 10: within the cooldown: skipped, no back-off
    assert scaler.scales["blocks.0.mlp"] == pytest.approx(s * GROWTH**9)
    clean_updates(114)
    flagged_update()  # update 125: 125 updates after the last back-off: backs off again
    assert scaler.scales["blocks.0.mlp"] == pytest.approx(s * GROWTH**123 / math.sqrt(2))
    assert scaler.updates == 126 and scaler.skipped == 3
    assert scaler.scales["blocks.0.attn"] == pytest.approx(2.0**13 * GROWTH**123)


def test_scales_are_clamped():
    top = ResblockScalingConfig(initial_scale_power=24)
    model = tiny(1)
    scaler = install_resblock_scaling(model, top, world_size=1)
    assert not scaler.check()
    scaler.update()
    assert set(scaler.scales.values()) == {2.0**24}

    bottom = ResblockScalingConfig(initial_scale_power=7)
    model = tiny(1)
    scaler = install_resblock_scaling(model, bottom)
    inject = Injector(model.blocks[0].attn.qkv)
    inject.armed = True
    assert step(model, scaler, torch.optim.SGD(model.parameters(), lr=0.1))
    assert scaler.scales["blocks.0.attn"] == 2.0**7  # floor: skipped, not lowered


def test_world_size_scales_the_bounds_and_flags_are_reduced_over_ranks():
    model = tiny(1)
    scaler = install_resblock_scaling(model, ResblockScalingConfig(scale_with_ranks=True), world_size=4)
    assert set(scaler.scales.values()) == {4 * 2.0**13}
    assert (scaler.min_scale, scaler.max_scale) == (4 * 2.0**7, 4 * 2.0**24)
    model(*batch()).loss.backward()
    with pytest.raises(GradScalingError, match="needs all_reduce"):
        scaler.check()

    def other_rank_overflowed_in_mlp(t):  # a MAX all-reduce where another rank flagged blocks.0.mlp
        t[1] = 1.0

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = snapshot(model, opt)
    assert step(model, scaler, opt, all_reduce=other_rank_overflowed_in_mlp)
    assert_same(snapshot(model, opt), before)
    assert scaler.scales == {"blocks.0.attn": 4 * 2.0**13, "blocks.0.mlp": 4 * 2.0**13 / math.sqrt(2)}


def test_skipping_step_restores_an_instance_level_step_and_works_with_an_lr_scheduler():
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # patches opt.step on the instance
    wrapped = vars(opt)["step"]
    p.grad = torch.ones(3)
    with skipping_step(opt, True) as record:
        opt.step()
    assert record.calls == 1 and torch.equal(p, torch.ones(3)) and not opt.state
    assert vars(opt)["step"] is wrapped
    with skipping_step(opt, False) as record:
        opt.step()
    assert record.calls == 0 and not torch.equal(p, torch.ones(3))
    sched.step()
    plain = torch.optim.SGD([p], lr=0.1)
    with skipping_step(plain):
        plain.step()
    assert "step" not in vars(plain)


# --- 4. gradient accumulation -----------------------------------------------------------------------


def test_accumulated_micro_steps_equal_one_big_step():
    model = tiny(2)
    scaler = install_resblock_scaling(model, FP32)
    odd_scales(scaler)
    text, codes = batch(4)
    model.zero_grad(set_to_none=True)
    for sl in (slice(0, 2), slice(2, 4)):
        (model(text[sl], codes[sl]).loss / 2).backward()
    accumulated = grads(model)
    assert_rounding_close(accumulated, backward(model, (text, codes)))
    assert not scaler.check()


def test_a_non_finite_micro_step_flags_the_whole_accumulated_step():
    model = tiny(1)
    scaler = install_resblock_scaling(model, ResblockScalingConfig())
    inject = Injector(model.blocks[0].attn.qkv)
    text, codes = batch(4)
    for i, sl in enumerate((slice(0, 2), slice(2, 4))):
        inject.armed = i == 0
        model(text[sl], codes[sl]).loss.backward()
    assert scaler.check() and scaler.last_nonfinite == ["blocks.0.attn"]


# --- 5. activation checkpointing --------------------------------------------------------------------


def checkpoint_blocks(model, how):
    for block in model.blocks:
        inner = block.forward
        if how == "deepspeed":
            import deepspeed

            def forward(x, _inner=inner):
                return deepspeed.checkpointing.checkpoint(_inner, x)
        else:

            def forward(x, _inner=inner):
                return torch.utils.checkpoint.checkpoint(_inner, x, use_reentrant=how == "reentrant")

        block.forward = forward


@pytest.mark.parametrize("how", ["reentrant", "non-reentrant", "deepspeed"])
def test_activation_checkpointing_applied_after_installing_gives_the_same_gradients(how, request):
    if how == "deepspeed":
        request.getfixturevalue("single_process_group")  # deepspeed.checkpointing needs deepspeed.comm
        import deepspeed

        deepspeed.checkpointing.configure(None, partition_activations=False, num_checkpoints=2)
    ref = tiny(2)
    model = copy.deepcopy(ref)
    ref_scaler = install_resblock_scaling(ref, ResblockScalingConfig())
    scaler = install_resblock_scaling(model, ResblockScalingConfig())
    checkpoint_blocks(model, how)
    recomputed_dtypes = []

    def record(module, args, out):
        recomputed_dtypes.append(out.dtype)

    model.blocks[1].mlp.fc.register_forward_hook(record)
    expected, got = backward(ref), backward(model)
    assert recomputed_dtypes == [torch.float16, torch.float16]  # forward, and the recompute in backward
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=0, msg=name)
    assert not scaler.check() and not ref_scaler.check()


def test_installing_after_activation_checkpointing_is_refused():
    model = tiny(1)
    checkpoint_blocks(model, "non-reentrant")
    with pytest.raises(GradScalingError, match="install per-resblock scaling before"):
        install_resblock_scaling(model, ResblockScalingConfig())
    model = tiny(1)
    scaler = install_resblock_scaling(model, ResblockScalingConfig())
    checkpoint_blocks(model, "non-reentrant")
    with pytest.raises(GradScalingError, match="wrapped again after installing"):
        scaler.remove()


# --- 6. checkpoints and config ----------------------------------------------------------------------


def test_state_dict_round_trip_resumes_exactly():
    model = tiny(2)
    twin = copy.deepcopy(model)
    scaler = install_resblock_scaling(model, ResblockScalingConfig(backoff_cooldown=3))
    inject = Injector(model.blocks[0].mlp.proj)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    for armed in (False, True, False, False, True):  # back-offs at updates 1 and 4 (cooldown 3)
        inject.armed = armed
        step(model, scaler, opt)
    state = scaler.state_dict()
    assert json.loads(json.dumps(state)) == state  # plain values: fits any checkpoint's client state
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)

    resumed = install_resblock_scaling(twin, ResblockScalingConfig(backoff_cooldown=3))
    resumed.load_state_dict(torch.load(buffer, weights_only=True), device="cpu")
    assert resumed.state_dict() == state and resumed.stats() == scaler.stats()
    # the cooldown survives: blocks.0.mlp backed off at update 4, so a flag at update 5 must not lower it
    assert state["last_decrease"][1] == 4 and state["skipped"] == 2
    mlp_scale = resumed.scales["blocks.0.mlp"]
    twin_inject = Injector(twin.blocks[0].mlp.proj)
    twin_inject.armed = inject.armed = True
    step(model, scaler, opt)
    step(twin, resumed, torch.optim.SGD(twin.parameters(), lr=0.0))
    assert resumed.state_dict() == scaler.state_dict()
    assert resumed.scales["blocks.0.mlp"] == mlp_scale and resumed.skipped == 3

    other = install_resblock_scaling(tiny(3), ResblockScalingConfig())
    with pytest.raises(GradScalingError, match="different layer count"):
        other.load_state_dict(state)


def test_stats():
    scaler = install_resblock_scaling(tiny(2), ResblockScalingConfig())
    for name, value in zip(scaler.scales, (256.0, 512.0, 1024.0, 4096.0), strict=True):
        scaler.set_scale(name, value)
    assert scaler.stats() == {
        "grad_scale_min": 256.0,
        "grad_scale_median": 768.0,
        "grad_scale_max": 4096.0,
        "grad_scale_updates": 0,
        "grad_scale_skipped": 0,
    }


def test_update_needs_check_first():
    scaler = install_resblock_scaling(tiny(1), ResblockScalingConfig())
    with pytest.raises(GradScalingError, match="call check"):
        scaler.update()


def test_config_defaults_are_the_papers_and_errors_name_the_key():
    cfg = ResblockScalingConfig.from_section({"enabled": True})
    assert cfg.scale_bounds(8) == (2.0**13, 2.0**7, 2.0**24)  # the equivalent of M * 2^k under DeepSpeed's mean
    paper = ResblockScalingConfig.from_section({"scale_with_ranks": True})
    assert paper.scale_bounds(8) == (8 * 2.0**13, 8 * 2.0**7, 8 * 2.0**24)
    assert cfg.growth_factor == 2 ** (1 / 1000) and cfg.backoff_factor == math.sqrt(2)
    assert cfg.backoff_cooldown == 125 and cfg.dtype == torch.float16
    for section, match in [
        ({"initial_scale": 13}, r"per_resblock_grad_scaling\.initial_scale=13: unknown key"),
        ({"backoff_cooldown": -1}, r"backoff_cooldown=-1: must be an integer >= 0"),
        ({"backoff_factor": 1.0}, r"backoff_factor=1\.0: must be a number > 1"),
        ({"doubling_interval": 0.5}, r"doubling_interval=0\.5: must be >= 1"),
        ({"initial_scale_power": 30}, r"initial_scale_power=30: must be <= max_scale_power=24"),
        ({"min_scale_power": "7"}, r"min_scale_power='7': must be a finite number"),
        ({"compute_dtype": "bfloat16"}, r"compute_dtype='bfloat16': must be one of"),
        ({"enabled": "yes"}, r"enabled='yes': must be true or false"),
    ]:
        with pytest.raises(GradScalingConfigError, match=match):
            ResblockScalingConfig.from_section(section)
    assert ResblockScalingConfig.from_ds_config({"train_batch_size": 8}) is None
    ds = {"per_resblock_grad_scaling": {"enabled": True, "backoff_cooldown": 50}, "fp16": {"enabled": False}}
    assert ResblockScalingConfig.from_ds_config(ds).backoff_cooldown == 50
    with pytest.raises(GradScalingConfigError, match=r"fp16\.enabled=True: must be false"):
        ResblockScalingConfig.from_ds_config({**ds, "fp16": {"enabled": True}})
    off = {"per_resblock_grad_scaling": {"enabled": False}, "bf16": {"enabled": True}}
    assert not ResblockScalingConfig.from_ds_config(off).enabled


# --- with a DeepSpeed engine ------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["2", "3", "3-zero-init"])
def test_deepspeed_zero_engine_skips_and_applies_steps(single_process_group, stage):
    """The tensor hooks run before DeepSpeed's gradient hooks (ZeRO 2 buckets, ZeRO 3 partitioned
    parameters, also built under zero.Init), and a skipped inner step leaves the parameters alone."""
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": int(stage[0])},
    }
    torch.manual_seed(0)
    if stage == "3-zero-init":
        with deepspeed.zero.Init(config_dict_or_path=config):
            model = DALLE(DalleConfig.from_name("dalle-tiny", n_layers=2), initialise=False)
        model.init_weights(around=lambda m: ds_adapter.gathered(list(m.parameters(recurse=False)), modifier_rank=0))
        for param in model.external_parameters():
            deepspeed.zero.register_external_parameter(model, param)
    else:
        model = tiny(2)
    scaler = install_resblock_scaling(model, ResblockScalingConfig())  # before deepspeed.initialize
    inject = Injector(model.blocks[0].mlp.fc)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)

    def params():
        if stage.startswith("3"):
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                return [p.detach().clone() for p in engine.module.parameters()]
        return [p.detach().clone() for p in engine.module.parameters()]

    def train_step():
        engine.backward(engine(*batch()).loss)
        skip = scaler.check(all_reduce=lambda t: torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX))
        with skipping_step(engine.basic_optimizer, skip) as record:
            engine.step()
        scaler.update()
        assert record.calls >= (1 if skip else 0)
        return skip

    assert not train_step()
    before = params()
    inject.armed = True
    assert train_step() and scaler.last_nonfinite == ["blocks.0.mlp"]
    after = params()
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    inject.armed = False
    assert not train_step()
    assert not all(torch.equal(a, b) for a, b in zip(after, params(), strict=True))
    assert all(torch.isfinite(p).all() for p in params())
