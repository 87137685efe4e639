#!/usr/bin/env python3
"""Train the BPE text tokenizer on a caption stream; writes tokenizer.json.

    python scripts/train_tokenizer.py --data data/shapes --out runs/tokenizer.json [--vocab-size 16384]

``--data`` is any source `dalle_ds.data.StreamLoader` streams (WebDataset shards, Parquet, an image folder with
metadata.jsonl, a hub id); only captions are read (no image is decoded). The tokenizer lower-cases,
has ``[UNK]`` as id 0, and loads with ``tokenizers.Tokenizer.from_file`` or as a
``transformers.PreTrainedTokenizerFast(tokenizer_file=...)``. BPE dropout is applied at training
time by the trainer (``--bpe-dropout``, default 0.1).
"""

import argparse
import itertools

from dalle_ds.data import DataConfig, iter_captions
from dalle_ds.data.text import train_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--max-captions", type=int, default=0, help="stop after this many (0: the whole stream)")
    p.add_argument("--caption-column", default=None)
    args = p.parse_args()
    captions = iter_captions(DataConfig(args.data, caption_column=args.caption_column))
    if args.max_captions:
        captions = itertools.islice(captions, args.max_captions)
    tok = train_tokenizer(captions, args.vocab_size, args.out)
    print(f"wrote {args.out}: {tok.get_vocab_size()} tokens")


if __name__ == "__main__":
    main()
