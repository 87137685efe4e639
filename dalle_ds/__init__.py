"""dalle-ds: train DALL-E-style text-to-image models with DeepSpeed."""

import importlib as _importlib
import importlib.abc as _importlib_abc
import importlib.util as _importlib_util
import sys as _sys
import warnings as _warnings

from .inference.serialization import load_dvae, load_model, save_model
from .models.attention import SparseAttention, block_attention, dense_attention, sparse_attention
from .models.config import (
    PRESETS,
    ConfigError,
    DalleConfig,
    DVAEConfig,
    VQGANConfig,
    get_preset,
    load_config,
    save_config,
)
from .models.dalle import DALLE, DalleOutput, pad_text
from .models.dvae import Decoder, DiscreteVAE, Encoder, map_pixels, unmap_pixels
from .models.masks import attention_mask, layer_schedule
from .models.vqgan import VQGAN

__version__ = "0.1.0"

# Module paths of releases before the package was laid out by layer (models/, data/, distributed/,
# training/, inference/, utils/). Model cards on the hub and users' scripts say e.g.
# `from dalle_ds.hub import from_pretrained` or `python -m dalle_ds.cluster`: those keep working,
# with a DeprecationWarning naming the new path.
_MOVED = {
    "dalle_ds.config": "dalle_ds.models.config",
    "dalle_ds.masks": "dalle_ds.models.masks",
    "dalle_ds.attention": "dalle_ds.models.attention",
    "dalle_ds.dvae": "dalle_ds.models.dvae",
    "dalle_ds.dalle": "dalle_ds.models.dalle",
    "dalle_ds.text": "dalle_ds.data.text",
    "dalle_ds.synthetic": "dalle_ds.data.synthetic",
    "dalle_ds.images": "dalle_ds.utils.images",
    "dalle_ds.powersgd": "dalle_ds.distributed.powersgd",
    "dalle_ds.cluster": "dalle_ds.distributed.cluster",
    "dalle_ds.checkpoint": "dalle_ds.training.checkpointing",
    "dalle_ds.serialization": "dalle_ds.inference.serialization",
    "dalle_ds.generation": "dalle_ds.inference.generation",
    "dalle_ds.evaluation": "dalle_ds.inference.evaluation",
    "dalle_ds.hub": "dalle_ds.inference.hub",
}


class _MovedModuleFinder(_importlib_abc.MetaPathFinder, _importlib_abc.Loader):
    """Imports an old module path as its new module (the same module object)."""

    def find_spec(self, name, path=None, target=None):
        if name not in _MOVED:
            return None
        _warnings.warn(f"{name} moved to {_MOVED[name]}; import it from there", DeprecationWarning, stacklevel=2)
        return _importlib_util.spec_from_loader(name, self)

    def create_module(self, spec):
        return _importlib.import_module(_MOVED[spec.name])

    def exec_module(self, module):
        pass  # already executed under its new name

    def get_code(self, name):  # `python -m <old path>` runs the new module as __main__
        source = f"import runpy\nrunpy.run_module({_MOVED[name]!r}, run_name='__main__', alter_sys=True)\n"
        return compile(source, f"<{name} -> {_MOVED[name]}>", "exec")


if not any(isinstance(f, _MovedModuleFinder) for f in _sys.meta_path):
    _sys.meta_path.append(_MovedModuleFinder())

__all__ = [
    "DALLE",
    "PRESETS",
    "ConfigError",
    "DVAEConfig",
    "DalleConfig",
    "DalleOutput",
    "Decoder",
    "DiscreteVAE",
    "Encoder",
    "SparseAttention",
    "VQGAN",
    "VQGANConfig",
    "attention_mask",
    "block_attention",
    "dense_attention",
    "get_preset",
    "layer_schedule",
    "load_config",
    "load_dvae",
    "load_model",
    "map_pixels",
    "pad_text",
    "save_config",
    "save_model",
    "sparse_attention",
    "unmap_pixels",
]
