"""Streaming image-text data through HuggingFace `datasets`, for many nodes, ranks and workers.

Sources (all opened with ``datasets.load_dataset(..., streaming=True)``):

- a hub dataset id (``--data user/name``, with ``image_column`` / ``caption_column``);
- WebDataset tar shards (``shards/*.tar``: ``jpg``/``png`` + ``txt`` or ``json``);
- Parquet files (``*.parquet``) whose image column holds bytes, an HF image struct or a local path;
- an image folder with ``metadata.jsonl`` (``file_name`` + caption);
- precomputed dVAE codes (Parquet with a ``codes`` column, from ``scripts/encode_images.py``):
  batches then carry ``codes`` instead of ``image``, and no image is decoded.

Distribution. The stream's shards (files) are shuffled per epoch by seed and dealt round-robin to
the (rank, worker) slots, so every slot reads a disjoint part and together they read everything.
With fewer shards than slots every slot reads every shard and keeps every ``slots``-th example
(what ``datasets.distributed.split_dataset_by_node`` does in that case). Each shard is its own
``IterableDataset.shard``, so a broken shard is skipped and counted without stopping the others.
Uneven shards give ranks uneven example counts; :class:`StreamLoader` ends an epoch on every rank
as soon as one rank runs dry (one all-reduce of a flag per batch, on the CPU group), so collectives never hang.

Resume. Each worker's stream (shard order, shuffle buffer) is a pure function of (seed, epoch,
slot). The loader records how many raw examples each worker had consumed when its last delivered
batch was made; a resumed worker replays its stream to that point without decoding anything
(reading bytes only) and continues, so nothing is repeated or skipped.

Bad input (corrupt or truncated images, decompression bombs, unreadable modes, empty, short or
boilerplate captions, extreme aspect ratios, unreadable shards) is skipped and counted, never fatal.
"""

from __future__ import annotations

import glob
import io
import json
import random
import re
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "BadSample",
    "DataConfig",
    "StreamLoader",
    "caption_problem",
    "iter_captions",
    "open_source",
    "paper_crop",
    "read_image",
    "to_rgb",
]

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img")
CAPTION_COLUMNS = ("txt", "caption", "text", "json")
CODES_COLUMN = "codes"
WHITE = (255, 255, 255)
BOILERPLATE = re.compile(
    r"^(image|photo|picture|untitled|no description|stock photo|thumbnail|click to enlarge|"
    r"(img|dsc|dscn|pict)[_ -]?\d+(\.\w+)?|[\w-]+\.(jpe?g|png|gif|webp|bmp|tiff?))$",
    re.IGNORECASE,
)


class BadSample(Exception):
    """An example to skip; ``reason`` names the counter it goes to."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class DataConfig:
    source: str
    """Hub id, a folder (image folder, or one holding .tar / .parquet shards), a file or a glob."""
    image_column: str | None = None
    """Default: the first of jpg, jpeg, png, webp, image, img that the source has."""
    caption_column: str | None = None
    """Default: the first of txt, caption, text, json (json: its "caption" or "text" key)."""
    split: str = "train"
    image_size: int = 256
    augment: bool = True
    """The paper's near-centre square crop, resize in [S, 9/8 S], random S crop; else centre crop."""
    min_aspect: float = 0.5
    max_aspect: float = 2.0
    min_caption_words: int = 2
    max_pixels: int = Image.MAX_IMAGE_PIXELS or 89_478_485
    """Larger images are skipped as decompression bombs (checked from the header, before decoding)."""
    shuffle_buffer: int = 1000
    seed: int = 0
    drop_last: bool = True
    """Drop each worker's last partial batch (training); False keeps it (encoding a whole set)."""

    def __post_init__(self):
        if self.image_size < 8:
            raise ValueError(f"DataConfig.image_size={self.image_size}: must be >= 8")
        if not 0 < self.min_aspect <= 1 <= self.max_aspect:
            raise ValueError(f"DataConfig aspect range [{self.min_aspect}, {self.max_aspect}] must contain 1")
        if self.shuffle_buffer < 1:
            raise ValueError(f"DataConfig.shuffle_buffer={self.shuffle_buffer}: must be >= 1")


# --- sources ----------------------------------------------------------------------------------


def _local_files(source: str) -> tuple[str, list[str]] | None:
    """(builder, files) for a local source, None for a hub id."""
    path = Path(source)
    if any(c in source for c in "*?["):
        files = sorted(glob.glob(source))
    elif path.is_dir():
        if (path / "metadata.jsonl").is_file():
            return "imagefolder", [str(path)]
        files = sorted(str(p) for p in path.iterdir() if p.suffix in (".tar", ".parquet"))
    elif path.is_file():
        files = [str(path)]
    else:
        return None
    if not files:
        raise FileNotFoundError(f"data source {source!r}: no .tar or .parquet files there")
    kinds = {Path(f).suffix for f in files}
    if kinds == {".tar"}:
        return "webdataset", files
    if kinds == {".parquet"}:
        return "parquet", files
    raise ValueError(f"data source {source!r}: mixes or has unknown file types {sorted(kinds)} (want .tar or .parquet)")


def open_source(cfg: DataConfig):
    """The source as a streaming ``datasets.IterableDataset`` with undecoded images, plus its
    (image column, caption column)."""
    import datasets

    local = _local_files(cfg.source)
    if local is None:
        ds = datasets.load_dataset(cfg.source, split=cfg.split, streaming=True)
    elif local[0] == "imagefolder":
        ds = datasets.load_dataset("imagefolder", data_dir=local[1][0], split="train", streaming=True)
    else:
        ds = datasets.load_dataset(local[0], data_files={"train": local[1]}, split="train", streaming=True)
    columns = list(ds.features or {})
    if cfg.image_column is None and CODES_COLUMN in columns:
        image_col = CODES_COLUMN  # precomputed dVAE codes
    else:
        image_col = cfg.image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    caption_col = cfg.caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
    for what, col in (("image_column", image_col), ("caption_column", caption_col)):
        if col is None or col not in columns:
            raise ValueError(f"data source {cfg.source!r}: {what}={col!r} not found; columns are {columns}")
    if image_col != CODES_COLUMN:
        ds = ds.cast_column(image_col, datasets.Image(decode=False))  # we decode: draft mode, errors counted
    return ds, image_col, caption_col


def iter_captions(cfg: DataConfig) -> Iterator[str]:
    """Every usable caption of the source, in file order (no image is read or decoded)."""
    ds, _, caption_col = open_source(cfg)
    for rows in ds.select_columns([caption_col]).iter(batch_size=256):
        for value in rows[caption_col]:
            caption = _caption_of(value)
            if caption_problem(caption, cfg.min_caption_words) is None:
                yield " ".join(caption.split())


# --- one example ----------------------------------------------------------------------------


def read_image(data: bytes, need: int, max_pixels: int) -> Image.Image:
    """Decode to RGB; JPEGs in draft mode (DCT scaling) at the smallest size >= ``need`` per side."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadSample("decompression_bomb")
            if img.format == "JPEG":
                img.draft("RGB", (need, need))
            img.load()
    except BadSample:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadSample("decompression_bomb") from None
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on broken files
        raise BadSample("corrupt_image") from None
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB: alpha composited on white, 16/32-bit scaled, CMYK/P/L converted."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        return Image.fromarray(np.clip(arr / top * 255 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        return Image.fromarray(((arr - lo) / max(hi - lo, 1e-12) * 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        out = Image.new("RGB", img.size, WHITE)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return img.convert("RGB")


def paper_crop(img: Image.Image, size: int, rng: random.Random | None) -> Image.Image:
    """The paper's augmentation: a square crop near the centre (offset uniform in the middle half
    of the slack), resize to a random side in [size, 9/8 size], random ``size`` crop; no flip.
    With ``rng=None``: centre square, resized to ``size`` (evaluation).

    Done as one antialiased bilinear resize of the final crop's box in source coordinates (the
    same pixels as resizing the square and then cropping, at a third of the cost of bicubic)."""
    w, h = img.size
    side = min(w, h)
    if rng is None:
        left, top = (w - side) / 2, (h - side) / 2
        box = (left, top, left + side, top + side)
    else:
        left = rng.uniform((w - side) / 4, 3 * (w - side) / 4)
        top = rng.uniform((h - side) / 4, 3 * (h - side) / 4)
        target = rng.randint(size, size * 9 // 8)
        x, y = rng.randint(0, target - size), rng.randint(0, target - size)
        scale = side / target
        box = (left + x * scale, top + y * scale, left + (x + size) * scale, top + (y + size) * scale)
    return img.resize((size, size), Image.BILINEAR, box=box)


def caption_problem(caption: Any, min_words: int) -> str | None:
    """The filter a caption fails (empty, short, boilerplate), or None."""
    if not isinstance(caption, str) or not caption.strip():
        return "empty_caption"
    text = " ".join(caption.split())
    if BOILERPLATE.match(text):
        return "boilerplate_caption"
    if len(text.split()) < min_words:
        return "short_caption"
    return None


def _caption_of(value: Any) -> Any:
    if isinstance(value, dict):  # WebDataset .json
        return value.get("caption", value.get("text"))
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if value.lstrip().startswith("{"):
            try:
                return _caption_of(json.loads(value))
            except ValueError:
                return value
    return value


def _image_bytes(value: Any) -> bytes:
    if isinstance(value, dict):
        if value.get("bytes"):
            return value["bytes"]
        if value.get("path"):
            try:
                return Path(value["path"]).read_bytes()
            except OSError:
                raise BadSample("missing_image_file") from None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise BadSample("missing_image")


def process(example: dict, cfg: DataConfig, image_col: str, caption_col: str, rng: random.Random | None):
    """(uint8 (3, S, S) image or int64 codes, caption) or BadSample."""
    caption = _caption_of(example.get(caption_col))
    problem = caption_problem(caption, cfg.min_caption_words)
    if problem:
        raise BadSample(problem)
    if image_col == CODES_COLUMN:
        codes = example.get(image_col)
        if not codes:
            raise BadSample("missing_codes")
        return torch.tensor(codes, dtype=torch.int64), " ".join(caption.split())
    need = -(-cfg.image_size * 9 // 8) if cfg.augment else cfg.image_size
    img = read_image(_image_bytes(example.get(image_col)), need, cfg.max_pixels)
    aspect = img.width / img.height
    if not cfg.min_aspect <= aspect <= cfg.max_aspect:
        raise BadSample("aspect_ratio")
    img = paper_crop(img, cfg.image_size, rng if cfg.augment else None)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1), " ".join(caption.split())


# --- one worker's stream --------------------------------------------------------------------


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        yield buf[i]
        buf[i] = item
    rng.shuffle(buf)
    yield from buf


class _WorkerStream(torch.utils.data.IterableDataset):
    """Batches of one (rank, worker) slot for one epoch; see the module docstring."""

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int, world: int, workers: int, epoch: int, state):
        super().__init__()
        self.cfg, self.batch_size, self.epoch = cfg, batch_size, epoch
        self.rank, self.world, self.workers = rank, world, max(workers, 1)
        self.state = state  # slot -> {"consumed": int, "counts": {...}} at the last delivered batch
        self.ds, self.image_col, self.caption_col = open_source(cfg)

    def _raw(self, slot: int, slots: int, on_bad_shard) -> Iterator[dict]:
        n = self.ds.num_shards
        order = list(range(n))
        random.Random(self.cfg.seed * 1_000_003 + self.epoch).shuffle(order)
        mine = order[slot::slots] if n >= slots else order
        seen = 0
        for index in mine:
            try:
                # `.iter()` reads the whole shard even inside a DataLoader worker (plain iteration
                # would split it again among the workers: we deal shards to slots ourselves).
                for rows in self.ds.shard(num_shards=n, index=index).iter(batch_size=64):
                    for i in range(len(rows[self.caption_col])):
                        seen += 1
                        if n < slots and (seen - 1) % slots != slot:
                            continue
                        yield {k: v[i] for k, v in rows.items()}
            except Exception as err:  # a shard the reader cannot parse: skip the rest of it
                on_bad_shard()
                warnings.warn(f"skipping the rest of data shard {index} of {self.cfg.source}: {err!r}", stacklevel=1)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        slot, slots = self.rank * self.workers + worker, self.world * self.workers
        saved = self.state.get(slot, {})
        skip, counts = saved.get("consumed", 0), Counter(saved.get("counts", {}))
        seed = (self.cfg.seed * 1_000_003 + self.epoch) * 65_537 + slot
        consumed = 0

        def on_bad_shard():  # a replayed failure was counted before the checkpoint already
            if consumed >= skip:
                counts["bad_shards"] += 1

        stream = _shuffled(self._raw(slot, slots, on_bad_shard), self.cfg.shuffle_buffer, random.Random(seed))
        aug = random.Random(seed + 1)
        key = "codes" if self.image_col == CODES_COLUMN else "image"
        images, captions = [], []
        for example in stream:
            consumed += 1
            if consumed <= skip:  # resume: replay without decoding
                continue
            aug.seed(seed * 1_000_003 + consumed)  # augmentation a function of the example's position
            try:
                image, caption = process(example, self.cfg, self.image_col, self.caption_col, aug)
            except BadSample as bad:
                counts[bad.reason] += 1
                continue
            counts["samples"] += 1
            images.append(image)
            captions.append(caption)
            if len(images) == self.batch_size:
                yield {key: torch.stack(images), "caption": captions, "slot": slot, "consumed": consumed,
                       "counts": dict(counts)}  # fmt: skip
                images, captions = [], []
        if images and self.cfg.drop_last:  # training: every batch has batch_size samples
            counts["dropped_tail_samples"] += len(images)
        elif images:
            yield {key: torch.stack(images), "caption": captions, "slot": slot, "consumed": consumed,
                   "counts": dict(counts)}  # fmt: skip
        yield {"slot": slot, "consumed": consumed, "counts": dict(counts), "end": True}


class StreamLoader:
    """This rank's endless stream of batches ``{"image": uint8 (B, 3, S, S), "caption": [...]}`` (or
    ``"codes"`` (B, grid**2) for precomputed codes). Images stay uint8 until the trainer has moved
    them to its device (a quarter of the bytes through worker queues and host-to-device copies).

    ``state_dict()`` / ``load_state_dict()`` carry the position (epoch, every worker's consumed
    count, whose turn is next) and the bad-input counters through checkpoints. ``counters()`` sums
    this rank's counts.

    Batches are taken from the workers in a fixed rotation (a worker leaves it when it is done), not
    in whatever order the DataLoader returns them: after a resume the DataLoader starts again at
    worker 0, and the rotation puts the batches back in the uninterrupted run's order.
    """

    def __init__(
        self,
        cfg: DataConfig,
        batch_size: int,
        rank: int = 0,
        world: int = 1,
        num_workers: int = 0,
        epochs: int | None = None,
    ):
        self.cfg, self.batch_size, self.rank, self.world, self.num_workers = cfg, batch_size, rank, world, num_workers
        self.epochs = epochs  # stop after this many epochs (None: endless)
        self.epoch = 0
        self.slots: dict[int, dict] = {}  # slot -> {"consumed", "counts"} at the last delivered batch
        self.past = Counter()  # counts of finished epochs (and epoch-end drops)
        self.turn: list[int] | None = None  # slots still delivering this epoch, the next one first
        self._it = None
        self._stash: dict[int, list[dict]] = {}

    # -- position ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        slots = json.loads(json.dumps(self.slots))
        return {"epoch": self.epoch, "slots": slots, "past": dict(self.past), "turn": self.turn}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.slots = {int(k): v for k, v in state["slots"].items()}
        self.past = Counter(state["past"])
        self.turn = state.get("turn")
        self._it = None

    def counters(self) -> dict[str, int]:
        total = Counter(self.past)
        for saved in self.slots.values():
            total.update(saved["counts"])
        return dict(total)

    # -- iteration --------------------------------------------------------------------------
    def _open_epoch(self):
        stream = _WorkerStream(
            self.cfg, self.batch_size, self.rank, self.world, self.num_workers, self.epoch, dict(self.slots)
        )
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False
        )
        if self.turn is None:
            workers = max(self.num_workers, 1)
            self.turn = [self.rank * workers + w for w in range(workers)]
        self._stash = {slot: [] for slot in self.turn}
        return iter(loader)

    def _next_local(self) -> dict | None:
        """The next full batch from this rank's workers, or None when all of them are done."""
        while self.turn:
            slot = self.turn[0]
            while not self._stash[slot]:
                item = next(self._it, None)
                if item is None:
                    raise RuntimeError(f"data worker for slot {slot} stopped without its end marker")
                self._stash[item["slot"]].append(item)
            item = self._stash[slot].pop(0)
            if item.get("end"):  # this worker is done: keep its final counts, drop it from the turn
                self.slots[slot] = {"consumed": item["consumed"], "counts": item["counts"]}
                self.turn.pop(0)
                continue
            self.turn = self.turn[1:] + [slot]
            return item
        return None

    def __iter__(self):
        from . import distributed as dd

        joined = self.world > 1 and dd.is_initialized()
        empty_epochs = 0
        while self.epochs is None or self.epoch < self.epochs:
            if self._it is None:
                self._it = self._open_epoch()
                delivered = 0
            item = self._next_local()
            have = 0 if item is None else 1
            if joined:  # every rank ends the epoch together (uneven shards must not hang collectives)
                have = dd.host_all_reduce(have, op="min", dtype=torch.int32)
            if have:
                self.slots[item["slot"]] = {"consumed": item["consumed"], "counts": item["counts"]}
                delivered += 1
                empty_epochs = 0
                yield {k: item[k] for k in ("image", "codes", "caption") if k in item}
                continue
            if item is not None:  # another rank ran dry first: this batch waits for the next epoch
                self.past["dropped_at_epoch_end"] += len(item["caption"])
            self._finish_epoch()
            empty_epochs = empty_epochs + 1 if delivered == 0 else 0
            if empty_epochs >= 2 or (empty_epochs and self.epochs is not None):
                raise RuntimeError(
                    f"data source {self.cfg.source!r} gave no complete batch of {self.batch_size} on rank "
                    f"{self.rank} for a whole epoch; bad-input counts: {self.counters()}"
                )

    def _finish_epoch(self) -> None:
        self._it = None  # drops the DataLoader: its workers exit
        for saved in self.slots.values():
            self.past.update(saved["counts"])
        self.slots = {}
        self.turn = None
        self.epoch += 1
