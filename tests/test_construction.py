"""Building the DALL-E on the meta device and materialising it one module at a time: the same
weights as an eager build under the same seed, in the trainer too, for a fraction of the host memory."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from launching import ds_config, shipped_config, spawn_ranks, train_args

from dalle_ds.models.config import DalleConfig, load_config
from dalle_ds.models.dalle import DALLE
from dalle_ds.models.init import materialise, meta_modules


def eager(seed=0, preset="dalle-tiny"):
    torch.manual_seed(seed)
    return DALLE(load_config(preset))


def meta_built(dtype, seed=0, preset="dalle-tiny"):
    torch.manual_seed(seed)
    with meta_modules():
        model = DALLE(load_config(preset))
    assert all(p.is_meta for p in model.parameters())
    return materialise(model, "cpu", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_materialised_weights_equal_an_eager_build_bitwise(dtype):
    reference = {k: v.to(dtype) for k, v in eager().state_dict().items()}  # what the engine's cast gives
    got = meta_built(dtype).state_dict()
    assert list(got) == list(reference) and len(got) == 55
    for name, value in got.items():
        assert value.dtype == dtype and value.device.type == "cpu", name
        assert torch.equal(value, reference[name]), name


def test_init_weights_is_the_whole_initialisation():
    model = eager()
    config = model.config
    assert torch.equal(model.blocks[0].ln_1.weight, torch.ones(config.d_model))
    assert not model.blocks[0].attn.qkv.bias.any() and not model.ln_f.bias.any()
    # Every parameter is set by init_weights alone: overwrite them all, re-seed, re-initialise.
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    torch.manual_seed(0)
    model.init_weights()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), eager().parameters(), strict=True))
    proj = model.blocks[0].attn.proj.weight.std().item()
    assert proj == pytest.approx(config.init_std / (2 * config.n_layers) ** 0.5, rel=0.1)


def test_materialise_refuses_what_init_weights_does_not_cover():
    class Extra(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(3))

    with meta_modules():
        model = DALLE(load_config("dalle-tiny"))
        model.blocks[0].extra = Extra()
    with pytest.raises(TypeError, match=r"no rule for blocks\.0\.extra \(Extra\)"):
        materialise(model, "cpu")


@pytest.mark.parametrize(
    "name",
    ["zero2", "zero3", pytest.param("zero2_bf16", marks=pytest.mark.slow)],
)
def test_trainer_starts_from_the_eager_weights_on_two_ranks(name, workdir, dvae_dir):
    """The trainer's model before its first step, on 2 ranks: ZeRO-2 built on the meta device and
    materialised (fp32, or bf16 as the engine holds it), ZeRO-3 built partitioned and initialised
    gathered, all equal to ``DALLE(config)`` under the run's seed (0)."""
    if name == "zero2_bf16":
        config, dtype = shipped_config(workdir, "zero2_bf16"), torch.bfloat16
    else:
        config, dtype = ds_config(workdir, int(name[-1])), torch.float32
    out = workdir / f"initial_{name}"
    argv = [str(a) for a in train_args(dvae_dir, out, config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = spawn_ranks(ROOT / "tests" / "initial_weights.py", argv, 2, env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len({(out / f"param_sha256_rank{r}.txt").read_text() for r in range(2)}) == 1
    got = torch.load(out / "initial_weights.pt", weights_only=True)
    reference = eager().state_dict()
    assert list(got) == list(reference)
    assert all(torch.equal(got[k], reference[k].to(dtype).float()) for k in got)


def construction_memory(how: str, dtype: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "construction_memory.py"), how, dtype],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_meta_construction_holds_one_module_of_fp32_values_not_the_model():
    """A 310 MB (fp32) model built for a bf16 engine: eagerly it passes through its whole fp32 size
    on the host; built on the meta device the host holds the bf16 model (which a GPU run keeps on the
    device) plus about one module's fp32 values."""
    before = construction_memory("eager", "bfloat16")
    after = construction_memory("meta", "bfloat16")
    assert before["fp32"] == after["fp32"] == 309_002_240 and after["model"] == before["fp32"] // 2
    assert before["growth"] >= 0.95 * before["fp32"], before
    overhead = after["growth"] - after["model"]  # construction beyond the weights themselves
    assert overhead < 0.25 * before["growth"], (before, after)
    assert overhead < 2 * after["largest_module"], after  # the scratch of one module's fp32 values


def test_a_model_built_under_zero_init_asks_for_the_gathered_init(single_process_group):
    """zero.Init partitions each module as it is built, so an eager init would write nothing: the
    constructor refuses, naming the path that initialises (init_weights with gathered modules)."""
    import deepspeed

    with pytest.raises(ValueError, match="initialise=False"):
        with deepspeed.zero.Init(config_dict_or_path={"train_micro_batch_size_per_gpu": 1,
                                                     "zero_optimization": {"stage": 3}}):  # fmt: skip
            DALLE(DalleConfig.from_name("dalle-tiny", n_layers=2))
