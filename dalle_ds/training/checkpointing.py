"""Exporting DeepSpeed training checkpoints to the consolidated safetensors folder format."""

from __future__ import annotations

from pathlib import Path

import torch

from ..inference.serialization import save_model
from ..models.config import ConfigError, DalleConfig, DVAEConfig
from ..models.dalle import DALLE
from ..models.dvae import DiscreteVAE

__all__ = ["COMPLETE", "export_checkpoint", "latest_complete_tag"]

COMPLETE = "complete.json"  # written into a checkpoint folder once every rank has finished it
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, ZeRO 3


def latest_complete_tag(ckpt_dir: str | Path) -> str | None:
    """The tag ``latest`` names if that checkpoint is complete, else the newest complete one."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    if latest.exists():
        tag = latest.read_text().strip()
        if (ckpt_dir / tag / COMPLETE).exists():
            return tag
    complete = sorted(p.name for p in ckpt_dir.glob("step*") if (p / COMPLETE).exists())
    return complete[-1] if complete else None


def export_checkpoint(ckpt_dir: str | Path, out_dir: str | Path, tag: str | None = None) -> Path:
    """Consolidate a dalle-ds DeepSpeed checkpoint (any ZeRO stage) into ``out_dir``.

    ZeRO 1-3: the fp32 master weights, through DeepSpeed's ``zero_to_fp32``. ZeRO 0: the module's
    weights as trained (fp32 runs are exact; 16-bit ones are cast up). The model config comes from
    the checkpoint itself. A frozen dVAE attached during training is not included.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag or latest_complete_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint (no step*/{COMPLETE})")
    states_path = next((ckpt_dir / tag / name for name in MODEL_STATES if (ckpt_dir / tag / name).is_file()), None)
    if states_path is None:
        raise FileNotFoundError(f"{ckpt_dir / tag}: no {' or '.join(MODEL_STATES)}: not a DeepSpeed checkpoint folder")
    states = torch.load(states_path, map_location="cpu", weights_only=True)
    data = states.get("model_config")
    if not isinstance(data, dict):
        raise ConfigError(f"{states_path}: no model_config in the client state (not written by dalle-ds?)")
    kinds = {"dalle": (DalleConfig, DALLE), "dvae": (DVAEConfig, DiscreteVAE)}
    config_cls, model_cls = kinds[data["model_type"]]
    config = config_cls.from_dict(data, source=str(states_path))
    stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if stage == 0:
        state = {k: v.float() for k, v in states["module"].items()}
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    state = {k: v for k, v in state.items() if not k.startswith("dvae.")}
    model = model_cls(config)
    model.load_state_dict(state, strict=True)
    return save_model(model, out_dir)
