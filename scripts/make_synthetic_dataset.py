#!/usr/bin/env python3
"""Write the captioned-shapes set as WebDataset tar shards (deterministic by seed).

    python scripts/make_synthetic_dataset.py --out data/shapes --size 4096 --shards 8 --image-size 64

Each sample: ``{key}.png`` (or .jpg), ``{key}.txt`` caption ("a red circle at the top left"),
``{key}.json`` attributes. ``--holdout N`` leaves N colour/shape/position combinations out (the
same ones the trainers' ``--holdout`` removes), for zero-shot evaluation.
"""

import argparse

from dalle_ds.data.synthetic import holdout_combos, write_webdataset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout", type=int, default=0)
    p.add_argument("--format", choices=("png", "jpg"), default="png")
    args = p.parse_args()
    paths = write_webdataset(
        args.out, args.size, args.shards, args.image_size, args.seed, holdout_combos(args.holdout), args.format
    )
    print(f"wrote {args.size} samples in {len(paths)} shards to {args.out}")


if __name__ == "__main__":
    main()
