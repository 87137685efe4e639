#!/usr/bin/env python3
"""Draw the DALL-E attention masks (row, column, conv) as PNGs, like the paper's Figure 11.

    python scripts/show_masks.py --text-len 6 --grid 4 --out masks/

Writes one PNG per kind plus ``masks.png`` with all three side by side. White = may attend;
text positions are tinted so the text/image boundary is visible.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from dalle_ds import attention_mask
from dalle_ds.models.masks import ATTENTION_KINDS


def render(mask: np.ndarray, text_len: int, scale: int) -> Image.Image:
    n = mask.shape[0]
    rgb = np.zeros((n, n, 3), dtype=np.uint8)
    rgb[mask] = 255
    rgb[:, :text_len][mask[:, :text_len]] = (150, 190, 255)  # text keys in blue
    rgb[(~mask) & (np.arange(n)[None, :] < text_len)] = (20, 30, 60)
    return Image.fromarray(rgb).resize((n * scale, n * scale), Image.NEAREST)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text-len", type=int, default=6)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--conv-kernel", type=int, default=3)
    parser.add_argument("--scale", type=int, default=0, help="pixels per cell (default: about 512 px wide)")
    parser.add_argument("--out", default="masks")
    args = parser.parse_args(argv)
    n = args.text_len + args.grid**2
    scale = args.scale or max(1, 512 // n)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for kind in ATTENTION_KINDS:
        mask = attention_mask(kind, args.text_len, args.grid, args.conv_kernel).numpy()
        img = render(mask, args.text_len, scale)
        img.save(out / f"{kind}.png")
        images.append(img)
    gap = max(4, scale)
    sheet = Image.new("RGB", (sum(i.width for i in images) + gap * 2, images[0].height), (128, 128, 128))
    x = 0
    for img in images:
        sheet.paste(img, (x, 0))
        x += img.width + gap
    sheet.save(out / "masks.png")
    print(f"wrote {', '.join(str(out / f'{k}.png') for k in ATTENTION_KINDS)} and {out / 'masks.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
