"""Saving and loading models as a folder: ``config.json`` + safetensors weights (no pickle).

Weights are one ``model.safetensors`` or, past ``max_shard_size``, the Hugging Face sharded layout:
``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json`` (``weight_map``: tensor
name -> file; ``metadata.total_size``), split by ``huggingface_hub``. Writing asks for one shard's
tensors at a time (:func:`save_weights`), so an export never holds more than a shard; every file is
written atomically, the index after its shards, and files of the other layout are removed last.
Loading reads either layout (the index wins if both are present) one file at a time.

Also reads OpenAI's released dVAE pickles (``encoder.pkl`` / ``decoder.pkl``) without
running code from them: the pickle is opened with PyTorch's ``weights_only`` unpickler,
which builds only tensors and plain containers; the handful of module classes such a
file names are admitted as inert record objects (never the real classes), so nothing
in the file can call a function or construct an arbitrary object.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from huggingface_hub.constants import SAFETENSORS_INDEX_FILE
from safetensors.torch import load_file, save_file

from ..models.config import ConfigError, DVAEConfig, config_from_dict
from ..models.dalle import DALLE
from ..models.dvae import DiscreteVAE
from ..models.init import meta_modules
from ..models.tokenizer import ImageTokenizer, build_model, is_tokenizer
from ..models.vqgan import VQGAN
from ..utils.files import atomic_path, atomic_write_text

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "UnsafeCheckpointError",
    "convert_openai_dvae",
    "load_dvae",
    "load_model",
    "load_tokenizer",
    "model_from_config",
    "openai_dvae_state_dict",
    "read_openai_pickle",
    "save_model",
    "save_weights",
    "shard_size",
    "weight_files",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = SAFETENSORS_INDEX_FILE  # model.safetensors.index.json
_SHARD_PATTERN = "model{suffix}.safetensors"  # {suffix}: -00001-of-00004


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file needs code execution (or unknown classes) to load and was refused."""


def save_model(
    model: DALLE | DiscreteVAE | VQGAN, directory: str | Path, max_shard_size: int | str | None = None
) -> Path:
    """Write ``config.json`` and the weights (fp32 kept as stored) into ``directory``: one
    ``model.safetensors``, or shards + index when ``max_shard_size`` (bytes or ``"5GB"``) is exceeded."""
    directory = Path(directory)
    state = {
        k: v.detach() for k, v in model.state_dict().items() if not k.startswith("dvae.")
    }  # an attached frozen dVAE is saved on its own
    shapes = {k: (v.shape, v.dtype) for k, v in state.items()}
    save_weights(directory, shapes, lambda names: {n: state[n].contiguous().cpu() for n in names}, max_shard_size)
    return write_config(model.config.to_dict(), directory)


def write_config(config: dict, directory: str | Path) -> Path:
    """``config.json`` (with its ``model_type``) into ``directory``; returns the folder."""
    atomic_write_text(Path(directory) / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    return Path(directory)


def save_weights(
    directory: str | Path,
    shapes: dict[str, tuple[torch.Size, torch.dtype]],
    read: Callable[[list[str]], dict[str, torch.Tensor]],
    max_shard_size: int | str | None = None,
) -> list[Path]:
    """Write tensors named in ``shapes`` (name -> (shape, dtype)), fetching each file's worth with
    ``read(names)``: one ``model.safetensors``, or shards of at most ``max_shard_size`` and the index.
    Returns the files written; weight files of an earlier save in ``directory`` are removed."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    max_shard_size = shard_size(max_shard_size)
    if max_shard_size is None:
        files, index = {WEIGHTS_NAME: list(shapes)}, None
    else:
        meta = {k: torch.empty(shape, dtype=dtype, device="meta") for k, (shape, dtype) in shapes.items()}
        split = split_torch_state_dict_into_shards(meta, filename_pattern=_SHARD_PATTERN, max_shard_size=max_shard_size)
        files = split.filename_to_tensors
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename} if split.is_sharded else None
    written = []
    for name, names in files.items():
        tensors = read(list(names))
        with atomic_path(directory / name) as tmp:
            save_file(tensors, tmp, metadata={"format": "pt"})
        del tensors
        written.append(directory / name)
    if index is not None:
        atomic_write_text(directory / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
    else:
        (directory / INDEX_NAME).unlink(missing_ok=True)
    for stale in [directory / WEIGHTS_NAME, *directory.glob("model-*-of-*.safetensors")]:
        if stale not in written:
            stale.unlink(missing_ok=True)
    return written


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def shard_size(text: str | int | None) -> int | None:
    """``"5GB"``, ``"500MiB"``, ``"100KB"`` or a byte count -> bytes; ``"none"`` / None -> None (one file)."""
    if text is None or isinstance(text, int):
        return text
    value = str(text).strip().upper()
    if value == "NONE":
        return None
    number = value.rstrip("KMGTIB ")
    unit = value[len(number) :].strip()
    try:
        size = float(number) * _UNITS[unit]
    except (ValueError, KeyError):
        raise ValueError(f"shard size {text!r}: expected a number of bytes or e.g. 5GB, 500MiB, or none") from None
    if size < 1:
        raise ValueError(f"shard size {text!r} must be positive")
    return int(size)


def weight_files(directory: str | Path) -> list[Path]:
    """The safetensors files holding a folder's weights: its shards (by the index) or ``model.safetensors``."""
    directory = Path(directory)
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{index_path}: not a safetensors index (no weight_map): {err}") from err
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index_path} names shards that are missing: {missing}")
        return files
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}")


def load_weights(model: torch.nn.Module, files: Iterable[Path], map_location="cpu") -> None:
    """Assign every tensor of ``files`` (one file at a time) to ``model``, which may live on the meta
    device; every weight must be found exactly once."""
    expected = {k for k in model.state_dict() if not k.startswith("dvae.")}
    seen: set[str] = set()
    for path in files:
        part = load_file(path, device=str(map_location))
        unexpected = sorted(set(part) - expected)
        if unexpected:
            raise ConfigError(f"{path}: holds weights the model does not have: {unexpected[:5]}")
        model.load_state_dict(part, strict=False, assign=True)
        seen.update(part)
    missing = sorted(expected - seen)
    if missing:
        raise ConfigError(f"weights missing from {[p.name for p in files]}: {missing[:5]}")


def model_from_config(data: dict, source: str) -> DALLE | DiscreteVAE | VQGAN:
    """A freshly built model for a config dict with a ``model_type`` (``dalle``, ``dvae`` or ``vqgan``)."""
    return build_model(config_from_dict(data, source))


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> DALLE | DiscreteVAE | VQGAN:
    """Load a folder written by :func:`save_model` (single file or sharded); the config's
    ``model_type`` picks the class. Built on the meta device, so weights are stored once."""
    directory = Path(directory)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing (expected {CONFIG_NAME} and {WEIGHTS_NAME} or {INDEX_NAME})")
    files = weight_files(directory)
    with meta_modules():
        model = model_from_config(json.loads(config_path.read_text()), source=str(config_path))
    load_weights(model, files, map_location)
    return model.eval()


def load_dvae(directory: str | Path, map_location: str | torch.device = "cpu") -> ImageTokenizer:
    """The image tokenizer of a saved folder: a dVAE (e.g. written by
    ``scripts/convert_openai_dvae.py``) or a VQGAN (``scripts/convert_taming_vqgan.py``), as its
    ``config.json`` says; both ``encode`` pixels in [0, 1] to (B, h, w) codes and ``decode`` back.

    A dVAE's ``.encoder(x)`` and ``.decoder(z)`` take and return what OpenAI's ``Encoder.forward``
    and ``Decoder.forward`` do: mapped pixels -> logits, one-hot codes -> 2C stats.
    """
    model = load_model(directory, map_location)
    if not is_tokenizer(model):
        raise ConfigError(f"{directory}: holds a {type(model).__name__}, not an image tokenizer (a dVAE or a VQGAN)")
    return model


load_tokenizer = load_dvae


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
