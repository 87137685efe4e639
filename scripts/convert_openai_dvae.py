#!/usr/bin/env python3
"""Convert OpenAI's released dVAE pickles (encoder.pkl, decoder.pkl) into a dalle-ds dVAE folder.

    python scripts/convert_openai_dvae.py --encoder encoder.pkl --decoder decoder.pkl --out dvae-openai/

The pickles are opened without running code from them (see dalle_ds.inference.serialization).
The result loads with ``dalle_ds.load_dvae(out)``.
"""

import argparse
import sys

from dalle_ds.inference.serialization import UnsafeCheckpointError, convert_openai_dvae


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", required=True, help="OpenAI encoder.pkl")
    parser.add_argument("--decoder", required=True, help="OpenAI decoder.pkl")
    parser.add_argument("--out", required=True, help="output folder (config.json + model.safetensors)")
    args = parser.parse_args(argv)
    try:
        model = convert_openai_dvae(args.encoder, args.decoder, args.out)
    except (UnsafeCheckpointError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    n = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.out}: dVAE with {n} parameters, codebook {model.config.codebook_size}, "
        f"grid {model.config.grid_size}x{model.config.grid_size} at {model.config.image_size}px"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
