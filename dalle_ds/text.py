"""Text tokenization: a BPE tokenizer trained with `tokenizers`, and caption -> padded id batches."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from .config import DalleConfig
from .dalle import pad_text

__all__ = ["UNK_TOKEN", "encode_captions", "load_tokenizer", "train_tokenizer"]

UNK_TOKEN = "[UNK]"


def train_tokenizer(captions: Iterable[str], vocab_size: int, path: str | Path | None = None):
    """Train a lower-casing BPE tokenizer (id 0 = ``[UNK]``) on captions; save as tokenizer.json if ``path``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[UNK_TOKEN], show_progress=False)
    tok.train_from_iterator(captions, trainer)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(path))
    return tok


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    return Tokenizer.from_file(str(path))


def encode_captions(tokenizer, captions: list[str], config: DalleConfig, bpe_dropout: float = 0.0) -> torch.Tensor:
    """(B, text_len) ids: BPE (with dropout when training), truncated, position-specific padding."""
    if tokenizer.get_vocab_size() > config.text_vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens but DalleConfig.text_vocab_size="
            f"{config.text_vocab_size}"
        )
    tokenizer.model.dropout = bpe_dropout if bpe_dropout > 0 else None
    try:
        ids = [enc.ids for enc in tokenizer.encode_batch(list(captions))]
    finally:
        tokenizer.model.dropout = None
    return pad_text(ids, config)
