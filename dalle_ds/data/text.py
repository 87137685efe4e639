"""Text tokenization: a BPE tokenizer trained with `tokenizers`, and caption -> padded id batches."""

from __future__ import annotations

import heapq
import json
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..models.config import DalleConfig
from ..models.dalle import null_text, pad_text

__all__ = ["UNK_TOKEN", "CaptionEncoder", "drop_captions", "encode_captions", "load_tokenizer", "train_tokenizer"]

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


def encode_captions(
    tokenizer,
    captions: Sequence[str],
    config: DalleConfig,
    bpe_dropout: float = 0.0,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """(B, text_len) ids: BPE (with seeded BPE-dropout when training), truncated, position-specific padding.

    ``bpe_dropout == 0``: the tokenizer's own fast ``encode_batch`` (deterministic, no ``rng`` needed).

    ``bpe_dropout = p > 0`` (BPE-dropout, Provilkov et al. 2020): the tokenizer's normalizer and pre-tokenizer
    split each caption into words, then the BPE merges are applied here, in Python, with every dropout decision
    drawn from ``rng`` (required; ``tokenizer.model.dropout`` is never touched: its Rust RNG can be neither
    seeded nor saved). The merge loop is the one of ``tokenizers``: the applicable merges of a word sit in a queue
    ordered by (merge rank, position); each time one is taken out it is dropped with probability p and set
    aside; the first one that is not dropped puts all set-aside merges back into the queue and is applied if
    still valid (queue entries made stale by earlier merges draw too, then are skipped). A word ends when the
    queue is empty: when every merge left in the queue is dropped in a row, the set-aside ones are not retried
    and the word keeps its current segmentation (p = 1: no merge at all, one token per character). As in
    ``tokenizers`` with dropout on, ``ignore_merges`` is not applied when p > 0. Dropout only changes the
    segmentation: the tokens of a word concatenate back to the word (unknown characters aside).

    Determinism: the ids are a pure function of (tokenizer, captions, p, state of ``rng`` at the call); no other
    random source is used. ``rng`` is advanced by whole blocks of :data:`_UNIFORM_BLOCK` uniforms, so pass a
    fresh generator per batch, e.g. ``numpy.random.default_rng([seed, rank, micro_step])``. Vocab and merges are
    parsed once per tokenizer object (re-parsed if its vocab size or BPE options change; swapping in a different
    model with the same size and options is not detected).

    With p > 0 only what can be reproduced exactly is supported; the rest raises ``ValueError`` naming the
    feature: a non-BPE model, ``byte_fallback``, a post-processor other than ``ByteLevel`` (which changes
    offsets only), tokenizer-level truncation/padding, an added (special) token appearing in a caption, an
    ``unk_token`` missing from the vocab.
    """
    if tokenizer.get_vocab_size() > config.text_vocab_size:
        raise ValueError(
            f"tokenizer has {tokenizer.get_vocab_size()} tokens but DalleConfig.text_vocab_size="
            f"{config.text_vocab_size}"
        )
    captions = list(captions)
    bpe_dropout = float(bpe_dropout)
    if not 0.0 <= bpe_dropout <= 1.0:
        raise ValueError(f"bpe_dropout must be in [0, 1], got {bpe_dropout}")
    if bpe_dropout == 0.0:
        if getattr(tokenizer.model, "dropout", None) is not None:  # a tokenizer.json saved with dropout on
            tokenizer.model.dropout = None
        ids = [enc.ids for enc in tokenizer.encode_batch(captions)]
    else:
        if rng is None:
            raise ValueError(
                "bpe_dropout > 0 needs rng (a numpy.random.Generator, e.g. "
                "numpy.random.default_rng([seed, rank, micro_step])) so that the dropout is reproducible"
            )
        ids = _bpe_encode(tokenizer, captions, bpe_dropout, rng)
    return pad_text(ids, config)


def drop_captions(
    text: torch.Tensor, p: float, rng: np.random.Generator, config: DalleConfig
) -> tuple[torch.Tensor, int]:
    """Caption dropout for classifier-free guidance: each row of ``text`` (B, text_len) becomes the
    null caption (all padding, what ``DALLE.generate(cond_scale=...)`` contrasts with) with
    probability ``p``, decided by ``rng``. Returns (text, number of rows dropped)."""
    if not 0 <= p <= 1:
        raise ValueError(f"caption dropout {p} must be in [0, 1]")
    drop = torch.from_numpy(rng.random(text.shape[0]) < p)
    if not drop.any():
        return text, 0
    null = null_text(config).to(text.device)
    return torch.where(drop.to(text.device)[:, None], null, text), int(drop.sum())


class CaptionEncoder:
    """Picklable ``captions, key -> (B, text_len) ids`` for data workers (``DataConfig.caption_encoder``).

    Holds the tokenizer as its JSON text and builds it once per process. With ``bpe_dropout > 0`` the
    dropout decisions come from ``numpy.random.default_rng([seed, *key])``: a pure function of the
    batch's key (epoch, worker slot, position in the slot's stream), which a resumed stream repeats.
    """

    def __init__(self, tokenizer, config: DalleConfig, bpe_dropout: float = 0.0, seed: int = 0):
        self.tokenizer_json = tokenizer.to_str()
        self.config, self.bpe_dropout, self.seed = config, float(bpe_dropout), int(seed)
        self._tokenizer = tokenizer

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_tokenizer"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tokenizer = None

    def __call__(self, captions: Sequence[str], key: Sequence[int]) -> torch.Tensor:
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_str(self.tokenizer_json)
        rng = np.random.default_rng([self.seed, *key]) if self.bpe_dropout > 0 else None
        return encode_captions(self._tokenizer, captions, self.config, bpe_dropout=self.bpe_dropout, rng=rng)


# ----------------------------------------------------------------------------------------------------------------
# BPE with dropout decisions from a numpy Generator (mirrors tokenizers' BPE::merge_word and Word::merge_all).

_UNIFORM_BLOCK = 1024
"""Uniforms are drawn from ``rng`` this many at a time (part of the determinism contract: changing it changes ids)."""

_CACHE_LIMIT = 1 << 16  # words per per-tokenizer cache; cleared when full


class _BpeTables:
    """Vocab and merges of one BPE tokenizer, parsed once from its JSON, plus per-word caches."""

    def __init__(self, model: dict, fingerprint: tuple):
        self.fingerprint = fingerprint
        if model.get("byte_fallback"):
            raise ValueError("BPE model with byte_fallback=true is not supported with bpe_dropout > 0")
        self.vocab: dict[str, int] = dict(model["vocab"])
        self.unk_token: str | None = model.get("unk_token")
        self.unk_id: int | None = self.vocab.get(self.unk_token) if self.unk_token is not None else None
        self.fuse_unk = bool(model.get("fuse_unk", False))
        self.prefix: str = model.get("continuing_subword_prefix") or ""
        self.suffix: str = model.get("end_of_word_suffix") or ""
        self.ignore_merges = bool(model.get("ignore_merges", False))
        prefix_bytes = len(self.prefix.encode())
        merges: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, merge in enumerate(model["merges"]):
            if isinstance(merge, str):  # tokenizers < 0.20 stores "a b"
                parts = merge.split(" ", 1)
                if len(parts) != 2:
                    raise ValueError(f"BPE merges: cannot parse merge {merge!r}")
                a, b = parts
            else:
                a, b = merge
            try:
                # As tokenizers: the prefix is cut from b by its byte length.
                new = a + b.encode()[prefix_bytes:].decode()
                merges[(self.vocab[a], self.vocab[b])] = (rank, self.vocab[new])  # a later duplicate wins
            except (KeyError, UnicodeDecodeError) as e:
                raise ValueError(f"BPE merges: merge {merge!r} refers to a token missing from the vocab") from e
        self.merges = merges
        self.initial: dict[str, tuple[tuple[int, ...], list[tuple[int, int, int]]]] = {}
        self.greedy: dict[str, list[int]] = {}  # p = 0 results
        self.added_key: tuple | None = None
        self.added_raw: list[str] = []
        self.added_normalized: list[str] = []

    def symbols(self, word: str) -> tuple[tuple[int, ...], list[tuple[int, int, int]]]:
        """Initial symbol ids of ``word`` (one per character, unknowns -> unk) and its initial merge heap."""
        hit = self.initial.get(word)
        if hit is not None:
            return hit
        vocab, prefix, suffix, unk_id = self.vocab, self.prefix, self.suffix, self.unk_id
        out: list[int] = []
        pending_unk = False
        last = len(word) - 1
        for i, ch in enumerate(word):
            s = prefix + ch if i and prefix else ch
            if i == last and suffix:
                s += suffix
            tid = vocab.get(s)
            if tid is not None:
                if pending_unk:
                    out.append(unk_id)
                    pending_unk = False
                out.append(tid)
            elif self.unk_token is not None:  # no unk_token: tokenizers drops the character
                if unk_id is None:
                    raise ValueError(f"BPE unk_token {self.unk_token!r} is not in the vocab")
                if pending_unk and not self.fuse_unk:
                    out.append(unk_id)
                pending_unk = True
        if pending_unk:
            out.append(unk_id)
        get = self.merges.get
        heap = []
        for i in range(len(out) - 1):
            m = get((out[i], out[i + 1]))
            if m is not None:
                heap.append((m[0], i, m[1]))
        heap.sort()  # a sorted list is a heap
        if len(self.initial) >= _CACHE_LIMIT:
            self.initial.clear()
        hit = self.initial[word] = (tuple(out), heap)
        return hit


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _fingerprint(tokenizer) -> tuple:
    model = tokenizer.model
    kind = type(model).__name__
    if kind != "BPE":
        raise ValueError(f"bpe_dropout > 0 needs a BPE tokenizer model, this one is {kind}")
    return (
        tokenizer.get_vocab_size(with_added_tokens=True),
        tokenizer.get_vocab_size(with_added_tokens=False),
        model.unk_token,
        model.continuing_subword_prefix,
        model.end_of_word_suffix,
        model.fuse_unk,
        model.byte_fallback,
        model.ignore_merges,
    )


def _tables(tokenizer) -> _BpeTables:
    """Parsed tables, cached per tokenizer object (re-parsed if its vocab size or BPE options change)."""
    fingerprint = _fingerprint(tokenizer)
    tables = _TABLES.get(tokenizer)
    if tables is None or tables.fingerprint != fingerprint:
        model = json.loads(tokenizer.to_str())["model"]  # a BPE model: _fingerprint checked it
        tables = _TABLES[tokenizer] = _BpeTables(model, fingerprint)
    return tables


def _check_pipeline(tokenizer, tables: _BpeTables) -> None:
    """Reject what the Python path cannot reproduce exactly (checked on every call: cheap, and mutable)."""
    from tokenizers import processors

    post = tokenizer.post_processor
    if post is not None and not isinstance(post, processors.ByteLevel):
        raise ValueError(
            f"tokenizer post_processor {type(post).__name__} is not supported with bpe_dropout > 0 "
            "(only none or ByteLevel)"
        )
    if tokenizer.truncation is not None:
        raise ValueError("tokenizer-level truncation is not supported with bpe_dropout > 0 (pad_text truncates)")
    if tokenizer.padding is not None:
        raise ValueError("tokenizer-level padding is not supported with bpe_dropout > 0 (pad_text pads)")
    added = tokenizer.get_added_tokens_decoder().values()
    key = tuple((t.content, t.normalized) for t in added)
    if key != tables.added_key:
        normalizer = tokenizer.normalizer
        tables.added_raw = [t.content for t in added if t.content and not t.normalized]
        tables.added_normalized = [
            normalizer.normalize_str(t.content) if normalizer is not None else t.content
            for t in added
            if t.content and t.normalized
        ]
        tables.added_key = key


def _words(tokenizer, tables: _BpeTables, captions: list[str]) -> list[list[str]]:
    """Normalized, pre-tokenized words of each caption, as the fast tokenizer sees them."""
    normalizer, pre = tokenizer.normalizer, tokenizer.pre_tokenizer
    out = []
    for caption in captions:
        for token in tables.added_raw:
            if token in caption:
                raise ValueError(
                    f"caption contains added token {token!r}: added_tokens are not supported with bpe_dropout > 0"
                )
        text = normalizer.normalize_str(caption) if normalizer is not None else caption
        for token in tables.added_normalized:
            if token in text:
                raise ValueError(
                    f"caption contains added token {token!r}: added_tokens are not supported with bpe_dropout > 0"
                )
        if pre is not None:
            out.append([w for w, _ in pre.pre_tokenize_str(text) if w])
        else:
            out.append([text] if text else [])
    return out


def _bpe_encode(tokenizer, captions: list[str], dropout: float, rng: np.random.Generator | None) -> list[list[int]]:
    """Token ids of each caption with BPE-dropout ``dropout`` drawn from ``rng`` (unused when dropout == 0)."""
    if dropout and not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    tables = _tables(tokenizer)
    _check_pipeline(tokenizer, tables)
    words = _words(tokenizer, tables, captions)
    get = tables.merges.get
    heappop, heappush = heapq.heappop, heapq.heappush
    buf: list[float] = []
    ui = 0
    out = []
    for caption_words in words:
        ids: list[int] = []
        for word in caption_words:
            if not dropout:
                hit = tables.greedy.get(word)
                if hit is not None:
                    ids.extend(hit)
                    continue
                if tables.ignore_merges and word in tables.vocab:
                    ids.append(tables.vocab[word])
                    continue
            sym, heap = tables.symbols(word)
            c = list(sym)
            n = len(c)
            if heap:
                heap = heap.copy()
                nxt = list(range(1, n + 1))
                nxt[-1] = -1
                prv = list(range(-1, n - 1))
                alive = [True] * n
                skip = []
                while heap:
                    top = heappop(heap)
                    if dropout:
                        if ui == len(buf):
                            buf, ui = rng.random(_UNIFORM_BLOCK).tolist(), 0
                        u = buf[ui]
                        ui += 1
                        if u < dropout:
                            skip.append(top)
                            continue
                        if skip:  # a merge survived: the dropped ones go back into the queue
                            for s in skip:
                                heappush(heap, s)
                            skip.clear()
                    _, pos, new_id = top
                    if not alive[pos]:
                        continue
                    right = nxt[pos]
                    if right == -1:
                        continue
                    m = get((c[pos], c[right]))
                    if m is None or m[1] != new_id:  # stale queue entry
                        continue
                    c[pos] = new_id
                    alive[right] = False
                    after = nxt[right]
                    nxt[pos] = after
                    if after != -1:
                        prv[after] = pos
                    before = prv[pos]
                    if before != -1:
                        m = get((c[before], new_id))
                        if m is not None:
                            heappush(heap, (m[0], before, m[1]))
                    if after != -1:
                        m = get((new_id, c[after]))
                        if m is not None:
                            heappush(heap, (m[0], pos, m[1]))
                c = [t for t, a in zip(c, alive, strict=True) if a]
            if not dropout:
                if len(tables.greedy) >= _CACHE_LIMIT:
                    tables.greedy.clear()
                tables.greedy[word] = c
            ids.extend(c)
        out.append(ids)
    return out
