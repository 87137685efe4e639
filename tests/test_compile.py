"""Compiled transformer blocks (``train.compile``, dalle_ds/training/compile_blocks.py): the same losses
and gradients as eager under DeepSpeed engines (ZeRO 1, ZeRO 3 with activation checkpointing, the
trainer at ZeRO 2), the eager forward for sampling, and the combinations refused.

Models have one block (one attention kind), so each compiled run builds one graph with grad (and
one without under activation checkpointing): ~10 s each for inductor on a 2-core CPU, less when
torch's compile cache already holds the same graph. A block's first call runs eagerly, so values
are compared from the second step on. Tolerance: inductor fuses and reorders fp32
arithmetic, so values agree to rounding: losses to 1e-6 relative (measured: equal), gradients to
1e-6 of each tensor's largest entry (measured: 5e-7); 2e-5 under activation checkpointing, whose
recompute runs another graph than the forward it stands for (measured: 8e-6, 1.4e-7 absolute)."""

import copy

import pytest
import torch

from dalle_ds import DALLE, save_config
from dalle_ds.distributed import ds_adapter
from dalle_ds.models.config import DalleConfig
from dalle_ds.training import DalleRunConfig, DalleTrainer, DVAERunConfig, DVAETrainer, parse_run_config
from dalle_ds.training.compile_blocks import compile_blocks, wrap_blocks
from dalle_ds.training.errors import UsageError
from dalle_ds.training.grad_scaling import ResblockScalingConfig, install_resblock_scaling


@pytest.fixture
def dynamo():
    """Dynamo's counters, emptied, with its caches of compiled code emptied before and after (they are
    kept per code object, across models and tests)."""
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield torch._dynamo.utils.counters
    torch._dynamo.reset()


def config() -> DalleConfig:
    # text_len 12: attention masks no other test file fills, so the first compiled run finds their
    # cache empty (the case that recompiles without an eager first call)
    return DalleConfig.from_name("dalle-tiny", n_layers=1, text_len=12)


def engine_config(stage: int, **sections) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage}, **sections}  # fmt: skip


def batch(seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 12), generator=g), torch.randint(0, 128, (2, 64), generator=g)


def train(ds_config: dict, compile: bool, steps: int = 3):
    """Losses of steps 2 .. ``steps`` and the full gradients of step 2, of a one-block DALL-E (built as
    the trainer builds it) whose blocks :func:`wrap_blocks` wrapped, under a DeepSpeed engine."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    torch.manual_seed(0)
    if ds_config["zero_optimization"]["stage"] == 3:
        with ds_adapter.zero3_init(ds_config):
            model = DALLE(config(), initialise=False)
        model.init_weights(around=lambda m: ds_adapter.gathered(list(m.parameters(recurse=False)), modifier_rank=0))
        for param in model.external_parameters():
            ds_adapter.register_external_parameter(model, param)
    else:
        model = DALLE(config())
    logged = []
    wrap_blocks(model.blocks, ds_config, compile, logged.append)
    assert len(logged) == compile
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()), config=ds_config)
    losses, grads = [], None
    for step in range(steps):
        loss = engine(*batch(step)).loss
        engine.backward(loss)
        if step == 1:
            grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
        engine.step()
        losses.append(loss.item())
    return losses[1:], grads, logged


def assert_rounding_close(compiled, eager, grad_tol=1e-6):
    (losses, grads, _), (eager_losses, eager_grads, _) = compiled, eager
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-6, atol=0)
    assert grads.keys() == eager_grads.keys() and len(grads) > 10
    for name, expected in eager_grads.items():
        atol = grad_tol * expected.abs().max().item()
        torch.testing.assert_close(grads[name], expected, rtol=0, atol=atol, msg=name)


def test_compiled_blocks_train_as_eager_under_zero1(single_process_group, dynamo):
    """Step 2's loss and gradients, and the loss after its update; compiled first, into empty caches."""
    ds_config = engine_config(1)
    compiled = train(ds_config, compile=True)
    assert dynamo["stats"]["unique_graphs"] == 1 and not dynamo["graph_break"]
    assert compiled[2] == ["train.compile: 1 transformer blocks compile on their second call (torch.compile)"]
    assert_rounding_close(compiled, train(ds_config, compile=False))


def test_a_zero3_step_with_activation_checkpointing_runs_compiled(single_process_group, dynamo):
    """Each block a ZeRO-3 leaf: its parameters gathered by hooks outside the compiled forward, one graph
    without grad (the checkpointed forward) and one with (the recompute in backward), no break."""
    ds_config = engine_config(3, activation_checkpointing={"partition_activations": False})
    eager = train(ds_config, compile=False, steps=2)
    compiled = train(ds_config, compile=True, steps=2)
    assert_rounding_close(compiled, eager, grad_tol=2e-5)
    assert dynamo["stats"]["unique_graphs"] == 2 and not dynamo["graph_break"]
    assert "each a ZeRO-3 leaf module" in compiled[2][0]


def test_sampling_with_a_kv_cache_runs_the_eager_forward(dynamo):
    torch.manual_seed(0)
    model = DALLE(config()).eval()
    eager = copy.deepcopy(model)
    compile_blocks(model.blocks)
    assert model.state_dict().keys() == eager.state_dict().keys()  # checkpoints and exports as eager
    text = batch(0)[0]
    got = model.generate(text, top_k=8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(got, eager.generate(text, top_k=8, generator=torch.Generator().manual_seed(1)))
    assert not dynamo["stats"]  # nothing traced


def test_per_resblock_grad_scaling_and_compile_are_refused_together():
    model = DALLE(config())
    install_resblock_scaling(model, ResblockScalingConfig())
    with pytest.raises(UsageError, match=r"train\.compile \(--compile\) and the DeepSpeed JSON's per_resblock_grad"):
        compile_blocks(model.blocks)


def test_blocks_whose_attention_runs_block_are_refused():
    """``block`` attention (chosen by ``auto`` on the CPU above 128 positions) does not trace."""
    for impl, grid in (("block", 8), ("auto", 16)):
        model = DALLE(DalleConfig.from_name("dalle-tiny", n_layers=1, attention_impl=impl, image_grid=grid))
        with pytest.raises(UsageError, match=rf"blocks\[0\] run attention_impl='{impl}' as 'block' on cpu"):
            compile_blocks(model.blocks, device_type="cpu")


def test_the_trainer_compiles_its_blocks_and_trains_as_eager(tmp_path, dvae_dir, single_process_group, dynamo):
    """The DALL-E trainer at ZeRO 2 (the shipped CPU config), three steps with and without --compile;
    metrics.jsonl holds losses to 6 decimals."""
    from launching import losses, shipped_config

    save_config(config(), tmp_path / "model.yaml")
    args = ["--deepspeed_config", shipped_config(tmp_path, "cpu_zero2_fp32"), "--preset", tmp_path / "model.yaml"]
    args += ["--dvae", dvae_dir, "--steps", 3, "--micro-batch-size", 2, "--data-size", 64, "--no-progress"]
    runs = []
    for flags in ((), ("--compile",)):
        out = tmp_path / f"run{len(runs)}"
        DalleTrainer(parse_run_config(DalleRunConfig, [str(a) for a in [*args, "--output-dir", out, *flags]])).run()
        runs.append(losses(out))
    torch.testing.assert_close(torch.tensor(runs[1]), torch.tensor(runs[0]), rtol=1e-6, atol=1e-6)
    assert dynamo["stats"]["unique_graphs"] == 1 and not dynamo["graph_break"]


def test_the_dvae_trainer_refuses_compile(tmp_path, single_process_group):
    from launching import shipped_config

    args = ["--deepspeed_config", shipped_config(tmp_path, "cpu_zero2_fp32"), "--preset", "dvae-tiny"]
    args += ["--output-dir", tmp_path / "dvae", "--steps", 1, "--micro-batch-size", 2, "--compile"]
    with pytest.raises(UsageError, match=r"train\.compile \(--compile\) .*; the dVAE has none"):
        DVAETrainer(parse_run_config(DVAERunConfig, [str(a) for a in args]))
