#!/usr/bin/env python3
"""Demo on a built-in default: draw the attention masks, then teach the tiny DALL-E a few pairs.

    ./scripts/demo.sh [--steps 150] [--out outputs/demo]

Until the data and trainer issues land, the "data set" is a handful of random captions paired
with random code grids. The model must memorise them: after training, greedy decoding from each
caption alone should reproduce its image codes, which only works if the text conditioning and the
sparse attention are wired right.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

from dalle_ds import DALLE, DalleConfig, layer_schedule, pad_text

sys.path.insert(0, str(Path(__file__).parent))
import show_masks  # noqa: E402


@torch.no_grad()
def greedy_codes(model: DALLE, text: torch.Tensor) -> torch.Tensor:
    codes = torch.zeros(text.shape[0], 0, dtype=torch.long)
    for _ in range(model.config.image_len):
        codes = torch.cat([codes, model.next_image_logits(text, codes).argmax(-1, keepdim=True)], dim=1)
    return codes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="dalle-tiny")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/demo")
    args = parser.parse_args(argv)
    start = time.time()
    out = Path(args.out)
    show_masks.main(["--text-len", "6", "--grid", "4", "--out", str(out / "masks")])

    torch.manual_seed(args.seed)
    cfg = DalleConfig.from_name(args.preset)
    model = DALLE(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset}: {n_params:,} parameters, layers {layer_schedule(cfg.n_layers)}, seq {cfg.seq_len}")
    captions = [torch.randint(0, cfg.text_vocab_size, (int(n),)).tolist() for n in torch.randint(3, 10, (args.pairs,))]
    text = pad_text(captions, cfg)
    codes = torch.randint(0, cfg.image_vocab_size, (args.pairs, cfg.image_len))

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.96), weight_decay=0.0)
    for step in range(1, args.steps + 1):
        res = model(text, codes)
        opt.zero_grad()
        res.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
        opt.step()
        if step == 1 or step % 25 == 0:
            print(
                f"step {step:4d}  loss {res.loss.item():.4f}  text {res.text_loss.item():.4f}  "
                f"image {res.image_loss.item():.4f}"
            )
    model.eval()
    recalled = (greedy_codes(model, text) == codes).float().mean().item()
    print(
        f"greedy decoding from the caption alone reproduces {100 * recalled:.1f}% of image tokens "
        f"(chance {100 / cfg.image_vocab_size:.1f}%)"
    )
    print(f"done in {time.time() - start:.1f}s; masks in {out / 'masks'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
