#!/usr/bin/env python3
"""Convert a taming-transformers VQGAN (Lightning .ckpt + its YAML) into a dalle-ds VQGAN folder.

    python scripts/convert_taming_vqgan.py --ckpt last.ckpt --config model.yaml --out vqgan-f16-16384/

The checkpoint is unpickled without running code from it (an allow-list unpickler; a file whose
pickle would call anything else is refused, exit code 1; see dalle_ds.inference.taming). The
discriminator and LPIPS weights (``loss.*``) are left out. The result loads with
``dalle_ds.load_model(out)`` and is what the DALL-E trainer's ``--dvae`` takes.
"""

import argparse
import sys

from dalle_ds.inference.serialization import UnsafeCheckpointError
from dalle_ds.inference.taming import convert_taming_vqgan
from dalle_ds.models.config import ConfigError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="taming checkpoint (last.ckpt)")
    parser.add_argument("--config", required=True, help="its YAML (model.params.ddconfig, n_embed, embed_dim)")
    parser.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    args = parser.parse_args(argv)
    try:
        model = convert_taming_vqgan(args.ckpt, args.config, args.out)
    except (UnsafeCheckpointError, ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.out}: VQGAN with {n} parameters, {c.codebook_size} codes of {c.embed_dim}, "
        f"grid {c.grid_size}x{c.grid_size} at {c.image_size}px"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
