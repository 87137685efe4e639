import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import free_port

from dalle_ds import DALLE, DalleConfig, get_preset
from dalle_ds.distributed.ds_adapter import apply_activation_checkpointing, backward, build_engine, loss_scale
from dalle_ds.distributed.ds_config import DeepSpeedConfigError, load_ds_config, prepare_ds_config
from dalle_ds.training.optim import param_groups

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def test_ds_configs_exist_for_every_axis():
    names = {p.name for p in CONFIGS}
    for required in (
        "zero0_fp16.json",
        "zero1_fp16.json",
        "zero2_fp16.json",
        "zero3_fp16.json",
        "zero2_bf16.json",
        "zero3_bf16.json",
        "zero3_bf16_offload.json",
        "cpu_zero2_fp32.json",
    ):
        assert required in names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    raw = load_ds_config(path)
    cfg = prepare_ds_config(raw, world_size=8, micro_batch_size=2, gradient_accumulation_steps=4, source=path.name)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (
        2,
        4,
        64,
    )
    # DeepSpeed's own parser accepts the prepared config (no model needed; one rank here).
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = DeepSpeedConfig(prepare_ds_config(raw, world_size=1, micro_batch_size=2, gradient_accumulation_steps=4))
    assert ds.train_batch_size == 8
    if "fp16" in raw:
        assert raw["fp16"]["loss_scale"] == 0, "fp16 configs use dynamic loss scaling"
    assert ds.zero_optimization_stage == raw.get("zero_optimization", {}).get("stage", 0)


def test_batch_sizes_are_checked_against_world_size():
    with pytest.raises(
        DeepSpeedConfigError,
        match=r"train_batch_size=30 != train_micro_batch_size_per_gpu=4 x "
        r"gradient_accumulation_steps=2 x world size 4 = 32",
    ):
        prepare_ds_config(
            {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2},
            world_size=4,
        )
    with pytest.raises(DeepSpeedConfigError, match=r"train_micro_batch_size_per_gpu=8 conflicts with the trainer's"):
        prepare_ds_config({"train_micro_batch_size_per_gpu": 8}, world_size=1, micro_batch_size=4)
    cfg = prepare_ds_config({"train_batch_size": 32, "gradient_accumulation_steps": 2}, world_size=4)
    assert cfg["train_micro_batch_size_per_gpu"] == 4
    with pytest.raises(DeepSpeedConfigError, match="not divisible"):
        prepare_ds_config({"train_batch_size": 30, "gradient_accumulation_steps": 2}, world_size=4)
    with pytest.raises(DeepSpeedConfigError, match="no batch size"):
        prepare_ds_config({}, world_size=2)


def test_unsafe_or_conflicting_settings_are_refused(tmp_path):
    base = {"train_micro_batch_size_per_gpu": 1}
    with pytest.raises(DeepSpeedConfigError, match="cpu_checkpointing=true needs partition_activations=true"):
        prepare_ds_config({**base, "activation_checkpointing": {"cpu_checkpointing": True}}, world_size=1)
    with pytest.raises(DeepSpeedConfigError, match="both true"):
        prepare_ds_config({**base, "fp16": {"enabled": True}, "bf16": {"enabled": True}}, world_size=1)
    with pytest.raises(DeepSpeedConfigError, match="'optimizer'/'scheduler' sections conflict with the run"):
        prepare_ds_config({**base, "optimizer": {"type": "Adam"}}, world_size=1)
    with pytest.raises(DeepSpeedConfigError, match="stage=4"):
        prepare_ds_config({**base, "zero_optimization": {"stage": 4}}, world_size=1)
    bad = tmp_path / "bad.json"
    bad.write_text('{"train_batch_size": 8,\n "zero_optimization": {"stage": 2,}}')
    with pytest.raises(DeepSpeedConfigError, match=r"bad.json: invalid JSON at line 2"):
        load_ds_config(bad)
    # Our own sections never reach DeepSpeed.
    cfg = prepare_ds_config({**base, "communication_hook": {"type": "powersgd"}}, world_size=1)
    assert "communication_hook" not in cfg


def test_param_groups_exclude_gains_biases_and_embeddings():
    model = DALLE(DalleConfig.from_name("dalle-tiny"))
    decay, no_decay = param_groups(model, 0.045)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("weight") and p.ndim == 2 for p in decay["params"])
    assert not any("emb" in names[id(p)] or "image_row" in names[id(p)] for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == sum(1 for _ in model.parameters())


def tiny_engine(config: dict, seed: int = 0, checkpointing: bool = False, sgd: bool = False):
    torch.manual_seed(seed)
    model = DALLE(DalleConfig.from_name("dalle-tiny", n_layers=3))
    cfg = prepare_ds_config(config, world_size=1, micro_batch_size=2, gradient_accumulation_steps=1)
    if checkpointing:
        assert apply_activation_checkpointing(model.blocks, cfg)
    if sgd:  # update = lr * gradient: makes gradient scale errors visible (Adam would hide them)
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
    else:
        opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3, betas=(0.9, 0.96))
    engine, _, _ = build_engine(model, cfg, opt)
    return engine


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (2, 16), generator=g), torch.randint(0, 128, (2, 64), generator=g)


def test_activation_checkpointing_gives_the_same_gradients(single_process_group):
    grads = []
    for ckpt in (False, True):
        cfg = {"activation_checkpointing": {"partition_activations": False}} if ckpt else {}
        engine = tiny_engine(cfg, checkpointing=ckpt)
        text, codes = batch()
        loss = engine(text, codes).loss
        engine.backward(loss)
        grads.append({n: p.grad.clone() for n, p in engine.module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5, msg=name)


def test_a_checkpointed_model_still_samples_with_its_kv_cache(single_process_group):
    """Blocks wrapped for activation checkpointing take the cache argument sampling passes them."""
    engine = tiny_engine({"activation_checkpointing": {"partition_activations": False}}, checkpointing=True)
    model = engine.module.eval()
    text, _ = batch()
    g = torch.Generator().manual_seed(0)
    cached = model.generate(text, top_k=4, generator=g)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(cached, model.generate(text, top_k=4, generator=g))
    assert cached.shape == (text.shape[0], model.config.image_len)


def test_fp16_on_cpu_is_allowed_inside_the_block_only():
    """Whatever this CPU reports (DeepSpeed says no without native fp16), fp16 is allowed inside the
    block, and the accelerator's own answer is back after it."""
    from deepspeed.accelerator import get_accelerator

    from dalle_ds.distributed.ds_adapter import allow_fp16_on_cpu, force_fp16_on_cpu

    acc = get_accelerator()
    before = acc.is_fp16_supported()
    with allow_fp16_on_cpu() as patched:
        assert acc.is_fp16_supported() and patched == (not before)
    assert acc.is_fp16_supported() == before

    class Refusing:
        def is_fp16_supported(self):
            return False

    force_fp16_on_cpu(Refusing)  # what launched test ranks get, on the class as it is defined
    assert Refusing().is_fp16_supported() is True


def test_zero0_fp16_update_matches_fp32_thanks_to_the_loss_scale_fix(single_process_group, fp16_on_cpu):
    fp16 = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}

    def update(config, fixed):
        engine = tiny_engine(config, sgd=True)
        before = {n: p.detach().float().clone() for n, p in engine.module.named_parameters()}
        text, codes = batch()
        loss = engine(text, codes).loss
        if fixed:
            backward(engine, loss)
        else:
            engine.backward(loss)
        engine.step()
        return {n: p.detach().float() - before[n] for n, p in engine.module.named_parameters()}

    ref = update({}, fixed=True)  # fp32
    fixed = update({"fp16": fp16}, fixed=True)
    broken = update({"fp16": fp16}, fixed=False)
    w = "blocks.0.mlp.fc.weight"
    ratio_fixed = fixed[w].norm() / ref[w].norm()
    ratio_broken = broken[w].norm() / ref[w].norm()
    assert 0.9 < ratio_fixed < 1.1, ratio_fixed
    assert ratio_broken < 1e-4, ratio_broken  # DeepSpeed alone: the update is 65536x too small
    assert torch.nn.functional.cosine_similarity(fixed[w].flatten(), ref[w].flatten(), dim=0) > 0.99


@pytest.mark.parametrize("stage", [1, 2])
def test_fp16_overflow_skips_the_step_and_lowers_the_scale(single_process_group, fp16_on_cpu, stage):
    fp16 = {
        "enabled": True,
        "loss_scale": 0,
        "initial_scale_power": 10,
        "loss_scale_window": 1000,
        "hysteresis": 1,
        "min_loss_scale": 1,
    }
    engine = tiny_engine({"fp16": fp16, "zero_optimization": {"stage": stage}})
    text, codes = batch()
    scale0 = loss_scale(engine)
    before = [p.detach().float().clone() for p in engine.module.parameters()]
    loss = engine(text, codes).loss
    backward(engine, loss * float("inf"))  # forced overflow
    engine.step()
    assert engine.skipped_steps == 1
    assert loss_scale(engine) == scale0 / 2
    assert all(torch.equal(b, p.detach().float()) for b, p in zip(before, engine.module.parameters(), strict=True))
    backward(engine, engine(text, codes).loss)  # a clean step goes through
    engine.step()
    assert engine.skipped_steps == 1
    assert not all(torch.equal(b, p.detach().float()) for b, p in zip(before, engine.module.parameters(), strict=True))


def test_deepspeed_version_check_names_the_supported_range():
    import deepspeed

    from dalle_ds.distributed.ds_adapter import SUPPORTED_DEEPSPEED, DeepSpeedVersionError, check_version

    assert check_version() == deepspeed.__version__  # the installed one is supported
    assert check_version("0.19.9") == "0.19.9"
    for bad in ("0.20.0", "0.18.5", "0.19.7"):
        with pytest.raises(DeepSpeedVersionError, match=r"deepspeed.*<0\.20.*>=0\.19\.8|deepspeed.*>=0\.19\.8"):
            check_version(bad)
    setup = (ROOT / "setup.py").read_text()  # one range: what pip installs is what the adapter accepts
    assert f'"deepspeed{",".join(SUPPORTED_DEEPSPEED)}"' in setup


def test_a_moved_deepspeed_internal_is_named():
    from dalle_ds.distributed.ds_adapter import DeepSpeedInternalsError, skipped_steps

    class Engine:  # an engine of a DeepSpeed that renamed the counter
        pass

    with pytest.raises(DeepSpeedInternalsError, match=r"Engine\.skipped_steps is missing.*skipped fp16 steps"):
        skipped_steps(Engine())


def test_no_weight_init_builds_without_initialisers_and_restores_them():
    from dalle_ds.models.init import meta_modules, no_weight_init

    normal = torch.nn.init.normal_
    with no_weight_init():
        t = torch.full((3,), 7.0)
        assert torch.nn.init.normal_(t) is t and torch.equal(t, torch.full((3,), 7.0))
    assert torch.nn.init.normal_ is normal
    with meta_modules():
        model = DALLE(get_preset("dalle-tiny"))
    assert all(p.is_meta for p in model.parameters())
    assert torch.nn.init.kaiming_uniform_.__module__ == "torch.nn.init"


def test_loading_a_model_and_building_an_engine_skip_the_compiler_imports(tmp_path):
    """In a fresh process: loading a saved model imports no torch._dynamo, building and stepping an
    engine no torch._inductor (DeepSpeed's Muon module is imported with lazy compile wrappers and
    still works as a class)."""
    from dalle_ds import DiscreteVAE, save_model

    save_model(DiscreteVAE(get_preset("dvae-tiny")), tmp_path / "dvae")
    code = f"""
import os, sys, json
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="{free_port()}")
import torch
from dalle_ds import load_model
model = load_model({str(tmp_path / "dvae")!r})
after_load = "torch._dynamo" in sys.modules
from dalle_ds.distributed import ds_adapter
ds_adapter.init_process_group("gloo")
net = torch.nn.Linear(4, 4)
config = {{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {{"stage": 2}}}}
config["zero_force_ds_cpu_optimizer"] = False
engine, opt, _ = ds_adapter.build_engine(net, config, torch.optim.AdamW(net.parameters()))
engine.backward(engine(torch.ones(1, 4)).sum())
engine.step()
from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam
print(json.dumps({{"dynamo_after_load": after_load, "inductor": "torch._inductor.compile_fx" in sys.modules,
                  "muon_is_class": isinstance(MuonWithAuxAdam, type)}}))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    flags = json.loads(proc.stdout.splitlines()[-1])
    assert flags == {"dynamo_after_load": False, "inductor": False, "muon_is_class": True}
