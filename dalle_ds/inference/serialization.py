"""Saving and loading models as a folder: ``config.json`` + ``model.safetensors`` (no pickle).

Also reads OpenAI's released dVAE pickles (``encoder.pkl`` / ``decoder.pkl``) without
running code from them: the pickle is opened with PyTorch's ``weights_only`` unpickler,
which builds only tensors and plain containers; the handful of module classes such a
file names are admitted as inert record objects (never the real classes), so nothing
in the file can call a function or construct an arbitrary object.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..models.config import ConfigError, DalleConfig, DVAEConfig
from ..models.dalle import DALLE
from ..models.dvae import DiscreteVAE
from ..utils.files import atomic_path, atomic_write_text

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "UnsafeCheckpointError",
    "convert_openai_dvae",
    "load_dvae",
    "load_model",
    "model_from_config",
    "openai_dvae_state_dict",
    "read_openai_pickle",
    "save_model",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
_MODEL_TYPES = {"dalle": (DalleConfig, DALLE), "dvae": (DVAEConfig, DiscreteVAE)}


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file needs code execution (or unknown classes) to load and was refused."""


def save_model(model: DALLE | DiscreteVAE, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (fp32 kept as stored) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().contiguous().cpu() for k, v in model.state_dict().items() if not k.startswith("dvae.")
    }  # an attached frozen dVAE is saved on its own
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    config = json.dumps(model.config.to_dict(), indent=2) + "\n"
    atomic_write_text(directory / CONFIG_NAME, config)
    return directory


def model_from_config(data: dict, source: str) -> DALLE | DiscreteVAE:
    """A freshly built model for a config dict with a ``model_type`` (``dalle`` or ``dvae``)."""
    kind = data.get("model_type")
    if kind not in _MODEL_TYPES:
        raise ConfigError(f"{source}: model_type={kind!r}, expected one of {sorted(_MODEL_TYPES)}")
    config_cls, model_cls = _MODEL_TYPES[kind]
    return model_cls(config_cls.from_dict(data, source=source))


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> DALLE | DiscreteVAE:
    """Load a folder written by :func:`save_model`; the config's ``model_type`` picks the class."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (expected {CONFIG_NAME} and {WEIGHTS_NAME})")
    with torch.device("meta"):
        model = model_from_config(json.loads(config_path.read_text()), source=str(config_path))
    state = load_file(weights_path, device=str(map_location))
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def load_dvae(directory: str | Path, map_location: str | torch.device = "cpu") -> DiscreteVAE:
    """Our dVAE from a saved folder (e.g. one written by ``scripts/convert_openai_dvae.py``).

    ``.encoder(x)`` and ``.decoder(z)`` take and return what OpenAI's ``Encoder.forward``
    and ``Decoder.forward`` do: mapped pixels -> logits, one-hot codes -> 2C stats.
    """
    model = load_model(directory, map_location)
    if not isinstance(model, DiscreteVAE):
        raise ConfigError(f"{directory}: holds a {type(model).__name__}, not a dVAE")
    return model


# --- OpenAI's released dVAE pickles -------------------------------------------------------


class _Record:
    """Inert stand-in for a pickled module: keeps the state the pickle gives it, runs nothing."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


_RECORD_NAMES = [
    "dall_e.encoder.Encoder",
    "dall_e.encoder.EncoderBlock",
    "dall_e.decoder.Decoder",
    "dall_e.decoder.DecoderBlock",
    "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.activation.ReLU",
    "torch.nn.modules.pooling.MaxPool2d",
    "torch.nn.modules.upsampling.Upsample",
    "torch.nn.modules.linear.Identity",
]
_RECORD_TYPES = {name: type(name.rsplit(".", 1)[1], (_Record,), {"__module__": __name__}) for name in _RECORD_NAMES}


def read_openai_pickle(path: str | Path) -> tuple[str, dict[str, int], dict[str, torch.Tensor]]:
    """(class name, hyper-parameters, state dict in our key names) of a pickled dall_e module."""
    safe = [(cls, name) for name, cls in _RECORD_TYPES.items()] + [torch.device]
    try:
        with torch.serialization.safe_globals(safe):
            root = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle.UnpicklingError and friends, with the offending global named
        raise UnsafeCheckpointError(
            f"{path}: refused to unpickle: it is not a dall_e Encoder/Decoder made of known "
            f"classes and tensors ({type(err).__name__}: {err})"
        ) from err
    kind = type(root).__name__
    if kind not in ("Encoder", "Decoder"):
        raise UnsafeCheckpointError(f"{path}: holds a {type(root).__name__}, expected a dall_e Encoder or Decoder")
    hparams = {
        k: getattr(root, k)
        for k in (
            "group_count",
            "n_hid",
            "n_blk_per_group",
            "input_channels",
            "output_channels",
            "vocab_size",
            "n_init",
        )
        if hasattr(root, k)
    }
    state: dict[str, torch.Tensor] = {}

    def walk(node, prefix: str) -> None:
        for name, param in node.__dict__.get("_parameters", {}).items():
            if param is not None:
                state[f"{prefix}{name}"] = param.detach()
        for name, child in node.__dict__.get("_modules", {}).items():
            if child is not None:
                walk(child, f"{prefix}{name}.")

    walk(root, "")
    state = openai_dvae_state_dict(state)
    # group_count is a class attribute in dall_e (never pickled): count the groups instead.
    hparams["group_count"] = len({k.split(".")[1] for k in state if k.startswith("blocks.group_")})
    return kind, hparams, state


def openai_dvae_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a dall_e Encoder/Decoder state dict to ours: its Conv2d's ``w``/``b`` are our ``weight``/``bias``."""
    renamed = {}
    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        leaf = {"w": "weight", "b": "bias"}.get(leaf, leaf)
        renamed[f"{prefix}.{leaf}" if prefix else leaf] = value.float().contiguous()
    return renamed


def convert_openai_dvae(encoder_path: str | Path, decoder_path: str | Path, out_dir: str | Path) -> DiscreteVAE:
    """Convert OpenAI's ``encoder.pkl`` + ``decoder.pkl`` into our saved dVAE folder."""
    enc_kind, enc_h, enc_state = read_openai_pickle(encoder_path)
    dec_kind, dec_h, dec_state = read_openai_pickle(decoder_path)
    if (enc_kind, dec_kind) != ("Encoder", "Decoder"):
        raise UnsafeCheckpointError(
            f"expected an Encoder and a Decoder, got {enc_kind} ({encoder_path}) and {dec_kind} ({decoder_path})"
        )
    for key in ("group_count", "n_hid", "n_blk_per_group", "vocab_size"):
        if enc_h.get(key) != dec_h.get(key):
            raise ConfigError(f"encoder {key}={enc_h.get(key)} but decoder {key}={dec_h.get(key)}")
    if enc_h["input_channels"] != dec_h["output_channels"]:
        raise ConfigError(
            f"encoder input_channels={enc_h['input_channels']} but decoder output_channels={dec_h['output_channels']}"
        )
    config = DVAEConfig(
        image_size=256,
        channels=enc_h["input_channels"],
        codebook_size=enc_h["vocab_size"],
        n_hid=enc_h["n_hid"],
        n_init=dec_h["n_init"],
        n_blk_per_group=enc_h["n_blk_per_group"],
        group_count=enc_h["group_count"],
    )
    model = DiscreteVAE(config)
    state = {f"encoder.{k}": v for k, v in enc_state.items()}
    state.update({f"decoder.{k}": v for k, v in dec_state.items()})
    model.load_state_dict(state, strict=True)
    save_model(model, out_dir)
    return model
