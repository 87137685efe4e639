"""scripts/convert_taming_vqgan.py: a taming Lightning checkpoint (with the non-tensor objects real
ones pickle: callback states keyed by their classes, hyper-parameters in OmegaConf and dict-subclass
containers, NumPy scalars, the discriminator's and LPIPS's weights) converts to our folder, whose
VQGAN gives taming's codes; a checkpoint whose pickle would run code is refused with exit code 1
before anything runs; configs taming's VQModel cannot have are errors naming the key."""

import contextlib
import os
import re
import sys
import types

import numpy as np
import pytest
import torch
import yaml
from conftest import run_script_main
from test_vqgan import TamingVQModel, randomised

from dalle_ds import get_preset, load_model
from dalle_ds.models.vqgan import VQGAN

CONFIG = get_preset("vqgan-tiny")


def taming_yaml(path, c=CONFIG, **params):
    ddconfig = dict(double_z=False, z_channels=c.z_channels, resolution=c.image_size, in_channels=3, out_ch=3,
                    ch=c.ch, ch_mult=list(c.ch_mult), num_res_blocks=c.num_res_blocks,
                    attn_resolutions=list(c.attn_resolutions), dropout=0.0)  # fmt: skip
    model = {"base_learning_rate": 4.5e-6, "target": "taming.models.vqgan.VQModel",
             "params": {"embed_dim": c.embed_dim, "n_embed": c.n_embed, "ddconfig": ddconfig,
                        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                                       "params": {"disc_start": 10000, "disc_weight": 0.8}}, **params}}  # fmt: skip
    path.write_text(yaml.safe_dump({"model": model}))
    return path


@contextlib.contextmanager
def fake_modules(**classes):
    """Modules named like Lightning's and OmegaConf's, holding ``classes`` while a checkpoint is
    pickled; gone afterwards, so loading cannot import them."""
    made = {}
    for dotted, cls in classes.items():
        module_name, _, name = dotted.rpartition(".")
        parts = module_name.split(".")
        for i in range(1, len(parts) + 1):  # the packages above it too
            made.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
        module = made[module_name]
        cls.__module__, cls.__qualname__ = module_name, name
        setattr(module, name, cls)
    sys.modules.update(made)
    try:
        yield
    finally:
        for name in made:
            del sys.modules[name]


class ModelCheckpoint:
    pass


class DictConfig:
    def __init__(self, content):
        self._content = content

    def __getstate__(self):
        return {"_content": self._content, "_metadata": {"flags": {}}}


class AttributeDict(dict):
    pass


def lightning_checkpoint(path, model, extra=None):
    state = dict(model.state_dict())
    state["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)  # not part of the tokenizer
    state["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(8, 3, 3, 3)
    hparams = AttributeDict(ddconfig=DictConfig({"ch": 32}), n_embed=128)
    ckpt = {"epoch": 3, "global_step": 1200, "pytorch-lightning_version": "1.0.8", "state_dict": state,
            "callbacks": {ModelCheckpoint: {"best_model_score": np.float64(0.25), "best_model_path": "x"}},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 4.5e-6, "params": [0, 1]}]}],
            "lr_schedulers": [], "hyper_parameters": hparams, **(extra or {})}  # fmt: skip
    with fake_modules(**{"pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint": ModelCheckpoint,
                         "omegaconf.dictconfig.DictConfig": DictConfig,
                         "pytorch_lightning.utilities.parsing.AttributeDict": AttributeDict}):  # fmt: skip
        torch.save(ckpt, path)
    return path


def test_a_lightning_checkpoint_converts_and_gives_tamings_codes(tmp_path, capsys):
    theirs = randomised(TamingVQModel(CONFIG), seed=5)
    ckpt = lightning_checkpoint(tmp_path / "last.ckpt", theirs)
    out = tmp_path / "vqgan"
    assert run_script_main("convert_taming_vqgan.py", "--ckpt", ckpt, "--config", taming_yaml(tmp_path / "m.yaml"),
                           "--out", out) == 0  # fmt: skip
    assert "128 codes of 16, grid 8x8 at 32px" in capsys.readouterr().out
    model = load_model(out)
    assert isinstance(model, VQGAN) and model.config == CONFIG
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        _, _, (_, _, index) = theirs.quantize(theirs.quant_conv(theirs.encoder(2 * images - 1)))
    assert torch.equal(model.encode(images), index.view(2, 8, 8))


class Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_whose_pickle_would_run_code_is_refused_before_it_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    ckpt = lightning_checkpoint(tmp_path / "evil.ckpt", randomised(TamingVQModel(CONFIG), 7),
                                extra={"callbacks": {"x": Exploit(marker)}})  # fmt: skip
    code = run_script_main("convert_taming_vqgan.py", "--ckpt", ckpt, "--config", taming_yaml(tmp_path / "m.yaml"),
                           "--out", tmp_path / "out")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and not marker.exists() and not (tmp_path / "out").exists()
    assert "evil.ckpt: refused" in err and f"{os.system.__module__}.system" in err and "could run code" in err


def test_the_unpickler_itself_refuses_what_the_scan_did_not_see(tmp_path):
    """A global the static scan cannot list (here: the scan skipped) is refused when the unpickler meets it."""
    from dalle_ds.inference import taming
    from dalle_ds.inference.serialization import UnsafeCheckpointError

    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "x": Exploit(marker)}, tmp_path / "evil.ckpt")
    scan = torch.serialization.get_unsafe_globals_in_checkpoint
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.serialization, "get_unsafe_globals_in_checkpoint", lambda f: [])
        with pytest.raises(UnsafeCheckpointError, match=r"system'\].*could run code"):
            taming.read_taming_checkpoint(tmp_path / "evil.ckpt")
    assert not marker.exists() and scan is torch.serialization.get_unsafe_globals_in_checkpoint


def test_a_remapped_codebook_takes_its_kept_codes_from_the_checkpoint(tmp_path):
    theirs = randomised(TamingVQModel(CONFIG), seed=8)
    state = dict(theirs.state_dict())
    state["quantize.used"] = torch.tensor([3, 17, 40, 41, 99])
    torch.save({"state_dict": state}, tmp_path / "remap.ckpt")
    yml = taming_yaml(tmp_path / "m.yaml", remap="data/used_codes.npy", sane_index_shape=True)
    assert run_script_main("convert_taming_vqgan.py", "--ckpt", tmp_path / "remap.ckpt", "--config", yml,
                           "--out", tmp_path / "out") == 0  # fmt: skip
    model = load_model(tmp_path / "out")
    assert model.config.remap_codes == 5 and model.config.codebook_size == 5
    assert model.quantize.used.tolist() == [3, 17, 40, 41, 99]


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda m: m.update(target="taming.models.vqgan.GumbelVQ"), "only taming's VQModel converts"),
        (lambda m: m["params"]["ddconfig"].update(double_z=True), "ddconfig.double_z=True: VQModel needs false"),
        (lambda m: m["params"]["ddconfig"].pop("ch_mult"), "model.params.ddconfig.ch_mult is missing"),
        (lambda m: m["params"].update(n_embed=256), r"quantize.embedding.weight has shape \(128, 16\)"),
    ],
)
def test_configs_that_do_not_fit_are_errors_naming_the_key(tmp_path, capsys, change, message):
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": randomised(TamingVQModel(CONFIG), 9).state_dict()}, ckpt)
    data = yaml.safe_load(taming_yaml(tmp_path / "m.yaml").read_text())
    change(data["model"])
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(data))
    code = run_script_main("convert_taming_vqgan.py", "--ckpt", ckpt, "--config", tmp_path / "m.yaml",
                           "--out", tmp_path / "out")  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and re.search(message, err), err
