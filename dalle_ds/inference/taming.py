"""taming-transformers VQGAN checkpoints (a Lightning ``.ckpt`` + its YAML) -> our VQGAN folder.

The ``.ckpt`` is unpickled by an allow-list unpickler: a global the pickle names resolves to what
PyTorch's ``weights_only`` loader allows (tensor and storage rebuilders, dtypes, plain containers)
or, for the libraries such files come from (``INERT_MODULES``: Lightning callback states keyed by
their classes, OmegaConf hyper-parameters, NumPy scalars), to an inert stand-in that keeps what it
is given and runs nothing. Any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen``
...) means the file would run code when unpickled: it is refused with :class:`UnsafeCheckpointError`
naming it, before anything is unpickled (the file's globals are listed first,
:func:`torch.serialization.get_unsafe_globals_in_checkpoint`) and again if one turns up while
unpickling.

The tokenizer is the checkpoint's ``state_dict`` less the ``loss.*`` entries (LPIPS and the
discriminator); the architecture comes from the YAML's ``model.params`` (``ddconfig``,
``n_embed``, ``embed_dim``; ``remap`` through the checkpoint's ``quantize.used``).
"""

from __future__ import annotations

import pickle
import types
from pathlib import Path

import torch
import yaml
from torch import _weights_only_unpickler

from ..models.config import ConfigError, VQGANConfig
from ..models.vqgan import VQGAN
from ..models.vqgan_loss import LPIPS
from .serialization import UnsafeCheckpointError, save_model

__all__ = [
    "INERT_MODULES",
    "convert_taming_vqgan",
    "load_lpips",
    "read_taming_checkpoint",
    "vqgan_config_from_taming",
]

INERT_MODULES = ("pytorch_lightning", "lightning", "lightning_fabric", "omegaconf", "taming", "main", "__main__",
                 "numpy", "_codecs", "copyreg", "collections", "pathlib", "argparse", "typing", "enum")  # fmt: skip
"""Top-level modules whose classes and functions a checkpoint may name: admitted as inert stand-ins
(never imported, never called). ``main`` is taming's training script (its callbacks)."""


class _Inert:
    """Stand-in for a global a checkpoint names: keeps its arguments, items and state, does nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state

    def _items(self) -> list:  # built by __new__ alone (NEWOBJ) there is no __init__ to make it
        return self.__dict__.setdefault("items", [])

    def __setitem__(self, key, value):  # a dict subclass's items
        self._items().append((key, value))

    def append(self, value):  # a list subclass's items
        self._items().append(value)

    def extend(self, values):
        self._items().extend(values)


def _refuse(names, path) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refused: its pickle names {sorted(names)}, which are neither tensors, containers nor classes "
        f"of the libraries checkpoints come from ({', '.join(INERT_MODULES)}): unpickling it could run code"
    )


def _safe_pickle_module(path: Path) -> types.ModuleType:
    """A ``pickle``-like module for ``torch.load`` whose unpickler resolves only allowed globals."""
    stand_ins: dict[str, type] = {}
    allowed = _weights_only_unpickler._get_allowed_globals()

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            full = f"{module}.{name}"
            if full in allowed:
                return allowed[full]
            if module.split(".", 1)[0] not in INERT_MODULES:
                raise _refuse([full], path)
            if full not in stand_ins:
                stand_ins[full] = type(name, (_Inert,), {"__module__": __name__})
            return stand_ins[full]

    module = types.ModuleType("dalle_ds_allow_list_pickle")
    module.Unpickler = Unpickler
    module.load = lambda f, **kw: Unpickler(f, **kw).load()
    return module


def read_taming_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a taming ``.ckpt``'s ``state_dict`` (or of a bare state dict), unpickled safely."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except ValueError:  # the pre-1.6 (non-zip) format: its globals are checked as it loads
        names = []
    unsafe = [n for n in names if n.split(".", 1)[0] not in INERT_MODULES]
    if unsafe:
        raise _refuse(unsafe, path)
    # Not weights_only=True: its unpickler only fills exact dicts and lists, and Lightning pickles
    # dict subclasses (hyper-parameters); the allow-list unpickler resolves the same allowed globals
    # (torch's weights_only list) plus inert stand-ins, and refuses every other global.
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_safe_pickle_module(path))
    except UnsafeCheckpointError:
        raise
    except Exception as err:  # a damaged or foreign file
        raise UnsafeCheckpointError(f"{path}: could not unpickle it ({type(err).__name__}: {err})") from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{path}: no state_dict of tensors in it (top-level keys: {_keys(ckpt)})")
    return state


def _keys(obj) -> list:
    return sorted(map(str, obj))[:10] if isinstance(obj, dict) else [type(obj).__name__]


def _get(data: dict, dotted: str, source: str):
    node = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"{source}: {dotted} is missing (a taming VQModel config has model.params.ddconfig)")
        node = node[part]
    return node


def vqgan_config_from_taming(data: dict, source: str, state: dict | None = None) -> VQGANConfig:
    """Our config from a taming YAML (its ``model`` section, or the whole file) and, for remapped
    codebooks, the checkpoint's ``quantize.used``."""
    if "model" not in data and "params" in data:
        data = {"model": data}
    target = _get(data, "model", source).get("target", "taming.models.vqgan.VQModel")
    if str(target).rsplit(".", 1)[-1] != "VQModel":
        raise ConfigError(
            f"{source}: model.target={target!r}: only taming's VQModel converts (VectorQuantizer or "
            "VectorQuantizer2 codebooks); GumbelVQ and EMAVQ models are not supported"
        )
    dd = _get(data, "model.params.ddconfig", source)
    if dd.get("double_z", True):
        raise ConfigError(f"{source}: model.params.ddconfig.double_z={dd.get('double_z', True)!r}: VQModel needs false")
    channels = _get(data, "model.params.ddconfig.in_channels", source)
    if dd.get("out_ch", channels) != channels:
        raise ConfigError(f"{source}: ddconfig.in_channels={channels} but out_ch={dd.get('out_ch')}: must be equal")
    used = (state or {}).get("quantize.used")
    return VQGANConfig(
        image_size=_get(data, "model.params.ddconfig.resolution", source),
        channels=channels,
        ch=_get(data, "model.params.ddconfig.ch", source),
        ch_mult=tuple(_get(data, "model.params.ddconfig.ch_mult", source)),
        num_res_blocks=_get(data, "model.params.ddconfig.num_res_blocks", source),
        attn_resolutions=tuple(_get(data, "model.params.ddconfig.attn_resolutions", source)),
        z_channels=_get(data, "model.params.ddconfig.z_channels", source),
        embed_dim=_get(data, "model.params.embed_dim", source),
        n_embed=_get(data, "model.params.n_embed", source),
        dropout=float(dd.get("dropout", 0.0)),
        remap_codes=0 if used is None else used.numel(),
    )


def convert_taming_vqgan(ckpt: str | Path, config: str | Path, out_dir: str | Path) -> VQGAN:
    """Convert a taming VQGAN (``.ckpt`` + YAML) into our saved folder; returns the model."""
    config = Path(config)
    if not config.is_file():
        raise FileNotFoundError(f"{config}: no such config")
    data = yaml.safe_load(config.read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"{config}: expected a YAML mapping, got {type(data).__name__}")
    state = read_taming_checkpoint(ckpt)
    vq_config = vqgan_config_from_taming(data, str(config), state)
    weights = {k: v.float() if v.is_floating_point() else v for k, v in state.items() if not k.startswith("loss.")}
    model = VQGAN(vq_config)
    expected = model.state_dict()
    extra, missing = sorted(set(weights) - set(expected)), sorted(set(expected) - set(weights))
    if extra or missing:
        raise ConfigError(
            f"{ckpt} does not fit {config}: unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}, "
            f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            want = tuple(expected[key].shape)
            raise ConfigError(f"{ckpt}: {key} has shape {tuple(value.shape)}, {config} makes {want}")
    model.load_state_dict(weights, strict=True)
    save_model(model, out_dir)
    return model.eval()


def load_lpips(path: str | Path) -> LPIPS:
    """LPIPS with weights from a local file: a safetensors or PyTorch file of its state dict, or a
    taming VQGAN checkpoint (its ``loss.perceptual_loss.*`` entries; read without running code). Every
    weight must be there; the error names the missing ones."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perceptual weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = read_taming_checkpoint(path)  # the allow-list unpickler
    prefix = "loss.perceptual_loss."
    if any(k.startswith(prefix) for k in state):
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    model = LPIPS()
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or extra:
        raise ValueError(f"perceptual weights {path}: missing {missing[:6]}, unexpected {extra[:6]} (LPIPS VGG16 keys)")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model
