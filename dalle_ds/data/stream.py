"""Streaming image-text data for many nodes, ranks and workers.

Sources:

- WebDataset tar shards (``shards/*.tar``): read here with :mod:`tarfile`, member by member;
  consecutive members sharing a key (the path up to the first dot of its file name) form an example:
  an image (``jpg``/``jpeg``/``png``/``webp``, any of them in any shard) and a caption (``txt``, or
  ``json`` with a ``caption`` or ``text`` key); ``json`` next to a ``txt`` is metadata;
- Parquet files (``*.parquet``, read per file with pyarrow, so files may differ in extra columns)
  whose image column holds bytes, an HF image struct or a local path; tar and Parquet shards may be
  mixed in one folder;
- a hub dataset id (``--data user/name``, with ``image_column`` / ``caption_column``) and an image
  folder with ``metadata.jsonl``, both through ``datasets.load_dataset(..., streaming=True)``;
- precomputed dVAE codes (Parquet with a ``codes`` column, from ``scripts/encode_images.py``):
  batches then carry ``codes`` instead of ``image``, and no image is decoded.

Distribution. The stream's shards (files) are shuffled per epoch by seed and dealt round-robin to
the (rank, worker) slots, so every slot reads a disjoint part and together they read everything.
With fewer shards than slots every slot reads every shard and keeps every ``slots``-th example
(the others are skipped without reading their bytes). Examples are shuffled within each shard
(a buffer of ``shuffle_buffer``, seeded per shard), so a position is (shard, examples taken from it).
Uneven shards give ranks uneven example counts; :class:`StreamLoader` ends an epoch on every rank
as soon as one rank runs dry (one all-reduce of a flag per batch, on the CPU group), so collectives never hang.

Resume. Each worker's stream is a pure function of (seed, epoch, slot). The loader records each
worker's position when its last delivered batch was made: the index of the current shard in its
shard order and how many of that shard's examples it had taken. A resumed worker does not open the
shards before it; it lists the current shard (tar headers / Parquet metadata), replays that shard's
shuffle on the list, and reads only the examples still to come (seeking to them). The resumed stream
equals the uninterrupted one; the extra bytes read are at most one shard per worker.

Bad input is skipped and counted per example, never fatal, and never costs a good example: see
:data:`REASONS` for every counter.
"""

from __future__ import annotations

import bisect
import glob
import io
import json
import os
import random
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "REASONS",
    "BadSample",
    "DataConfig",
    "StreamLoader",
    "caption_problem",
    "crop_tensor",
    "is_english",
    "iter_captions",
    "open_source",
    "paper_crop",
    "read_image",
    "to_rgb",
]

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img")
CAPTION_COLUMNS = ("txt", "caption", "text", "json")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
"""Tar members that are images. Any of them is decoded by its content, so a shard may mix them."""
CAPTION_EXTENSIONS = ("txt", "caption", "text", "json")
METADATA_EXTENSIONS = frozenset({"json", "cls", "cls2", "id", "key", "url", "meta", "index"})
"""Tar members that travel with an example without being used (``json`` is a caption only when
the example has no ``txt``); any other extension is counted as ``unexpected_extension``."""
CODES_COLUMN = "codes"
WHITE = (255, 255, 255)
BOILERPLATE = re.compile(
    r"^(image|photo|picture|untitled|no description|stock photo|thumbnail|click to enlarge|"
    r"(img|dsc|dscn|pict)[_ -]?\d+(\.\w+)?|[\w-]+\.(jpe?g|png|gif|webp|bmp|tiff?))$",
    re.IGNORECASE,
)
BINARY = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
REASONS = {
    "samples": "delivered",
    "corrupt_image": "image bytes that do not decode (broken, truncated, not an image whatever the extension)",
    "empty_image": "an image member of 0 bytes",
    "decompression_bomb": "more pixels than max_pixels (from the header, before decoding)",
    "aspect_ratio": "aspect ratio outside [min_aspect, max_aspect]",
    "missing_image": "a caption without an image member (or a Parquet row without image bytes)",
    "missing_image_file": "a Parquet/image-folder row whose image path cannot be read",
    "missing_caption": "an image member without a caption member",
    "unexpected_extension": "a tar member whose extension is no image, caption or metadata type (counted per member)",
    "caption_not_utf8": "a caption that is not valid UTF-8",
    "binary_caption": "a caption with control characters (binary data)",
    "bad_json": "a .json caption that is not JSON (or not an object)",
    "json_without_caption": "a .json caption without a string caption or text key",
    "empty_caption": "an empty or blank caption",
    "short_caption": "fewer than min_caption_words words",
    "boilerplate_caption": "a caption like 'IMG_1234.jpg' or 'untitled'",
    "non_english": "a caption the language filter (english_only) did not find English",
    "missing_codes": "a codes row without codes",
    "bad_shards": "a shard that cannot be opened or parsed at all (not a tar, not Parquet, missing columns)",
    "truncated_shards": "a tar cut short: everything before the cut is delivered, a partial example is lost",
    "dropped_tail_samples": "a worker's last partial batch (drop_last)",
    "dropped_at_epoch_end": "batches left when another rank ran dry",
}


class BadSample(Exception):
    """An example to skip; ``reason`` names the counter it goes to (None: already counted)."""

    def __init__(self, reason: str | None):
        super().__init__(reason)
        self.reason = reason


@dataclass
class DataConfig:
    source: str
    """Hub id, a folder (image folder, or one holding .tar / .parquet shards), a file or a glob."""
    image_column: str | None = None
    """Default: the first of jpg, jpeg, png, webp, image, img that the example (tar) or file has."""
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
    """Examples are shuffled within each shard through a buffer of this many."""
    seed: int = 0
    drop_last: bool = True
    """Drop each worker's last partial batch (training); False keeps it (encoding a whole set)."""
    english_only: bool = False
    """The paper's language filter: skip captions not detected as English (py3langid, whose model
    ships in its wheel), counted as ``non_english``."""
    fast_jpeg: bool = True
    """Decode JPEGs with libjpeg's fast integer DCT and plain chroma upsampling (~12% faster, mean
    pixel difference ~1/255); False: the accurate DCT."""
    caption_encoder: Callable[[list[str], tuple[int, ...]], torch.Tensor] | None = None
    """Tokenize each batch's captions in the data workers: ``caption_encoder(captions, key)`` returns
    the batch's ``"text"`` ids; ``key`` = (epoch, slot, examples the slot had consumed) identifies the
    batch, so seeded BPE dropout gives a resumed run the ids of the uninterrupted one (see
    :class:`dalle_ds.data.text.CaptionEncoder`). Must be picklable."""

    def __post_init__(self):
        if self.image_size < 8:
            raise ValueError(f"DataConfig.image_size={self.image_size}: must be >= 8")
        if not 0 < self.min_aspect <= 1 <= self.max_aspect:
            raise ValueError(f"DataConfig aspect range [{self.min_aspect}, {self.max_aspect}] must contain 1")
        if self.shuffle_buffer < 1:
            raise ValueError(f"DataConfig.shuffle_buffer={self.shuffle_buffer}: must be >= 1")


# --- sources ----------------------------------------------------------------------------------


def _local_files(source: str) -> tuple[str, list[str]] | None:
    """(kind, files) for a local source, None for a hub id. Kind: "imagefolder" or "shards"."""
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
    unknown = sorted({Path(f).suffix for f in files} - {".tar", ".parquet"})
    if unknown:
        raise ValueError(f"data source {source!r}: unknown file types {unknown} (want .tar or .parquet)")
    return "shards", files


def open_source(cfg: DataConfig):
    """The source as a streaming ``datasets.IterableDataset`` with undecoded images, plus its
    (image column, caption column). :class:`StreamLoader` uses it for hub ids and image folders;
    it reads tar and Parquet shards itself (per example, per file)."""
    import datasets

    local = _local_files(cfg.source)
    if local is None:
        ds = datasets.load_dataset(cfg.source, split=cfg.split, streaming=True)
    elif local[0] == "imagefolder":
        ds = datasets.load_dataset("imagefolder", data_dir=local[1][0], split="train", streaming=True)
    else:
        kinds = {Path(f).suffix for f in local[1]}
        builder = "webdataset" if kinds == {".tar"} else "parquet"
        ds = datasets.load_dataset(builder, data_files={"train": local[1]}, split="train", streaming=True)
    columns = list(ds.features or {})
    image_col, caption_col = _pick_columns(cfg, columns, cfg.source)
    if image_col != CODES_COLUMN:
        ds = ds.cast_column(image_col, datasets.Image(decode=False))  # we decode: draft mode, errors counted
    return ds, image_col, caption_col


def _pick_columns(cfg: DataConfig, columns: list[str], where: str) -> tuple[str, str]:
    if cfg.image_column is None and CODES_COLUMN in columns:
        image_col = CODES_COLUMN  # precomputed dVAE codes
    else:
        image_col = cfg.image_column or next((c for c in IMAGE_COLUMNS if c in columns), None)
    caption_col = cfg.caption_column or next((c for c in CAPTION_COLUMNS if c in columns), None)
    for what, col in (("image_column", image_col), ("caption_column", caption_col)):
        if col is None or col not in columns:
            raise ValueError(f"data source {where!r}: {what}={col!r} not found; columns are {columns}")
    return image_col, caption_col


class _CountingFile:
    """A binary file that adds the bytes it reads to ``io["bytes_read"]``."""

    def __init__(self, path: str, io_counts: Counter):
        self.f = open(path, "rb")  # noqa: SIM115 - closed by close()
        self.io = io_counts
        io_counts["shards_opened"] += 1

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.io["bytes_read"] += len(data)
        return data

    def readinto(self, buf) -> int:
        n = self.f.readinto(buf)
        self.io["bytes_read"] += n or 0
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.f.seek(offset, whence)

    def tell(self) -> int:
        return self.f.tell()

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.f.fileno()

    @property
    def closed(self) -> bool:
        return self.f.closed

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# --- raw examples: what a shard yields, before decoding -----------------------------------------


class _Item:
    """One position of a shard's stream: an example, or a shard-level failure (``bad``)."""

    __slots__ = ("bad", "extra", "index")

    def __init__(self, index: int, bad: str | None = None):
        self.index, self.bad, self.extra = index, bad, ()

    def fields(self, cfg: DataConfig) -> dict:
        raise BadSample(self.bad)


class _TarExample(_Item):
    """Consecutive tar members sharing a key. ``parts``: extension -> bytes, or (offset, size) in
    ``path`` when not read yet (skipped while listing, read on first use)."""

    __slots__ = ("io", "key", "parts", "path")

    def __init__(self, index: int, key: str, path: str, io_counts: Counter):
        super().__init__(index)
        self.key, self.path, self.io, self.parts = key, path, io_counts, {}

    def data(self, ext: str) -> bytes:
        value = self.parts[ext]
        if isinstance(value, tuple):
            offset, size = value
            with _CountingFile(self.path, self.io) as f:
                self.io["shards_opened"] -= 1  # a seek into a shard already counted as opened
                f.seek(offset)
                value = f.read(size)
            if len(value) != size:
                raise BadSample("corrupt_image")
            self.parts[ext] = value
        return value

    def fields(self, cfg: DataConfig) -> dict:
        image_ext = _first(self.parts, (cfg.image_column,) if cfg.image_column else IMAGE_EXTENSIONS)
        caption_ext = _first(self.parts, (cfg.caption_column,) if cfg.caption_column else CAPTION_EXTENSIONS)
        if image_ext is None:
            # Members of unknown type were counted as unexpected_extension: the image was one of them.
            raise BadSample(None if self.extra else "missing_image")
        if caption_ext is None:
            raise BadSample("missing_caption")
        return {"image": self.data(image_ext), "caption": _tar_caption(self.data(caption_ext), caption_ext)}


class _Row(_Item):
    """A Parquet or ``datasets`` row: ``row`` holds ``image`` (or ``codes``) and ``caption``, or is a
    callable that loads it."""

    __slots__ = ("row",)

    def __init__(self, index: int, row):
        super().__init__(index)
        self.row = row

    def fields(self, cfg: DataConfig) -> dict:
        if callable(self.row):
            self.row = self.row()
        return self.row


def _first(parts: dict, names) -> str | None:
    return next((n for n in names if n in parts), None)


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = the path up to the first dot of the file name, extension = the
    rest, lower-cased (``a/b.seg.png`` -> ``a/b``, ``seg.png``)."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


def _tar_caption(data: bytes, ext: str) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSample("caption_not_utf8") from None
    if BINARY.search(text):
        raise BadSample("binary_caption")
    if ext != "json":
        return text
    try:
        value = json.loads(text)
    except ValueError:
        raise BadSample("bad_json") from None
    if not isinstance(value, dict):
        raise BadSample("bad_json")
    caption = value.get("caption", value.get("text"))
    if not isinstance(caption, str):
        raise BadSample("json_without_caption")
    return caption


def _open_shard(path: str, io_counts: Counter) -> _CountingFile | None:
    """The shard's file, counting the bytes read from it; None (with a warning) if it cannot be opened."""
    try:
        return _CountingFile(path, io_counts)
    except OSError as err:
        warnings.warn(f"skipping data shard {path}: {err!r}", stacklevel=3)
        return None


def _tar_items(path: str, io_counts: Counter, read: Callable[[int], bool], cfg: DataConfig) -> Iterator[_Item]:
    """The examples of one tar shard in order, index 0, 1, ...; members of examples for which
    ``read(index)`` is false are skipped without reading them (``tarfile`` seeks over them). A shard
    that cannot be opened yields one ``bad_shards`` item; one cut short yields what precedes the cut
    and then one ``truncated_shards`` item. The sequence depends on the tar headers only."""
    f = _open_shard(path, io_counts)
    if f is None:
        yield _Item(0, "bad_shards")
        return
    with f:
        size = os.fstat(f.fileno()).st_size
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except (tarfile.TarError, OSError, ValueError, EOFError) as err:
            warnings.warn(f"skipping data shard {path}: not a readable tar ({err!r})", stacklevel=2)
            yield _Item(0, "bad_shards")
            return
        images = (cfg.image_column,) if cfg.image_column else IMAGE_EXTENSIONS
        captions = (cfg.caption_column,) if cfg.caption_column else CAPTION_EXTENSIONS
        known = {*IMAGE_EXTENSIONS, *CAPTION_EXTENSIONS, *METADATA_EXTENSIONS, *images, *captions}
        index, example, wanted, truncated = 0, None, False, False
        while True:
            try:
                member = tar.next()
            except (tarfile.TarError, OSError, ValueError, EOFError):
                truncated = True
                break
            tar.members.clear()  # no index of the whole shard in memory
            if member is None:
                f.seek(tar.offset)
                end = f.read(2 * tarfile.BLOCKSIZE)  # a complete archive ends with zero blocks
                truncated = len(end) < 2 * tarfile.BLOCKSIZE or end.count(0) != len(end)
                break
            if not member.isreg():
                continue  # directories, links: not data
            if member.offset_data + member.size > size:
                truncated = True
                break
            key, ext = _split_name(member.name)
            if example is None or key != example.key:
                if example is not None:
                    yield example
                    index += 1
                example, wanted = _TarExample(index, key, path, io_counts), read(index)
            if ext in known:
                if wanted and ext not in METADATA_EXTENSIONS - {"json"}:
                    f.seek(member.offset_data)
                    example.parts[ext] = f.read(member.size)
                else:
                    example.parts[ext] = (member.offset_data, member.size)
            else:
                example.extra = (*example.extra, "unexpected_extension")
        if example is not None:
            complete = _first(example.parts, images) and _first(example.parts, captions)
            if not truncated or complete:
                yield example
                index += 1
        if truncated:
            warnings.warn(f"data shard {path} is cut short after {index} examples", stacklevel=2)
            yield _Item(index, "truncated_shards")


def _parquet_items(path: str, io_counts: Counter, listing: bool, cfg: DataConfig) -> Iterator[_Item]:
    """The rows of one Parquet file (its own columns: files may differ in extra columns). With
    ``listing``, rows come from the footer's row count and are read on first use, a row group at a
    time."""
    import pyarrow.parquet as pq

    f = _open_shard(path, io_counts)
    if f is None:
        yield _Item(0, "bad_shards")
        return
    with f:
        try:
            pf = pq.ParquetFile(f)
            image_col, caption_col = _pick_columns(cfg, pf.schema_arrow.names, path)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError... on a file that is not Parquet
            warnings.warn(f"skipping data shard {path}: {err!r}", stacklevel=2)
            yield _Item(0, "bad_shards")
            return
        key = "codes" if image_col == CODES_COLUMN else "image"
        columns = [image_col, caption_col]
        if listing:
            groups = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
            starts = np.cumsum([0, *groups]).tolist()
            cache: dict[int, list[dict]] = {}

            def load(i: int) -> dict:
                group = bisect.bisect_right(starts, i) - 1
                if group not in cache:
                    with _CountingFile(path, io_counts) as lazy:
                        io_counts["shards_opened"] -= 1  # the same shard, already counted
                        cache[group] = pq.ParquetFile(lazy).read_row_group(group, columns=columns).to_pylist()
                row = cache[group][i - starts[group]]
                return {key: row[image_col], "caption": row[caption_col]}

            for i in range(starts[-1]):
                yield _Row(i, lambda i=i: load(i))
            return
        index = 0
        try:
            for batch in pf.iter_batches(batch_size=256, columns=columns):
                for row in batch.to_pylist():
                    yield _Row(index, {key: row[image_col], "caption": row[caption_col]})
                    index += 1
        except Exception as err:
            warnings.warn(f"skipping the rest of data shard {path}: {err!r}", stacklevel=2)
            yield _Item(index, "bad_shards")


def _dataset_items(ds, n: int, shard: int, image_col: str, caption_col: str) -> Iterator[_Item]:
    """One shard of a ``datasets`` stream (hub id, image folder); read whole even when listing."""
    key = "codes" if image_col == CODES_COLUMN else "image"
    index = 0
    try:
        # `.iter()` reads the whole shard even inside a DataLoader worker (plain iteration would
        # split it again among the workers: we deal shards to slots ourselves).
        for rows in ds.shard(num_shards=n, index=shard).iter(batch_size=64):
            for image, caption in zip(rows[image_col], rows[caption_col], strict=True):
                yield _Row(index, {key: image, "caption": caption})
                index += 1
    except Exception as err:  # a shard the reader cannot parse: skip the rest of it
        warnings.warn(f"skipping the rest of data shard {shard}: {err!r}", stacklevel=2)
        yield _Item(index, "bad_shards")


class _Source:
    """The shards of a source and how to read each one."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        local = _local_files(cfg.source)
        self.ds = None
        if local is not None and local[0] == "shards":
            self.files = local[1]
            self.key = "image"
            first = next((f for f in self.files if f.endswith(".parquet")), None)
            if first is not None and not any(f.endswith(".tar") for f in self.files):
                import pyarrow.parquet as pq

                names = pq.read_schema(first).names  # fail early on a misnamed column
                self.key = "codes" if _pick_columns(cfg, names, first)[0] == CODES_COLUMN else "image"
            self.num_shards = len(self.files)
        else:
            self.ds, self.image_col, self.caption_col = open_source(cfg)
            self.key = "codes" if self.image_col == CODES_COLUMN else "image"
            self.num_shards = self.ds.num_shards

    def items(self, shard: int, io_counts: Counter, read: Callable[[int], bool] | None) -> Iterator[_Item]:
        """Shard ``shard``'s items; ``read=None``: list them, reading as little as the format allows."""
        if self.ds is not None:
            return _dataset_items(self.ds, self.num_shards, shard, self.image_col, self.caption_col)
        path = self.files[shard]
        if path.endswith(".tar"):
            return _tar_items(path, io_counts, read or (lambda i: False), self.cfg)
        return _parquet_items(path, io_counts, read is None, self.cfg)


def iter_captions(cfg: DataConfig) -> Iterator[str]:
    """Every usable caption of the source, in file order (no image is read or decoded)."""
    source = _Source(cfg)
    io_counts: Counter = Counter()
    for shard in range(source.num_shards):
        for item in source.items(shard, io_counts, None):
            try:
                caption = _caption_of(_caption_only(item, cfg))
            except BadSample:
                continue
            if caption_problem(caption, cfg.min_caption_words) is None and (
                not cfg.english_only or is_english(caption)
            ):
                yield " ".join(caption.split())


def _caption_only(item: _Item, cfg: DataConfig):
    if isinstance(item, _TarExample):  # the image is not read: only whether the example has one
        ext = _first(item.parts, (cfg.caption_column,) if cfg.caption_column else CAPTION_EXTENSIONS)
        if ext is None or _first(item.parts, (cfg.image_column,) if cfg.image_column else IMAGE_EXTENSIONS) is None:
            raise BadSample("missing_caption" if ext is None else "missing_image")
        return _tar_caption(item.data(ext), ext)
    return item.fields(cfg)["caption"]


# --- one example ----------------------------------------------------------------------------


def read_image(data: bytes, need: int, max_pixels: int, fast: bool = False) -> Image.Image:
    """Decode to RGB; JPEGs in draft mode (DCT scaling) at the smallest size >= ``need`` per side
    (``fast``: libjpeg's fast integer DCT and plain chroma upsampling)."""
    if not data:
        raise BadSample("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > max_pixels:
                raise BadSample("decompression_bomb")
            if img.format == "JPEG":
                img.draft("RGB", (need, need))
                if fast and img.decoderconfig:
                    img.decoderconfig = (img.decoderconfig[0], 1)  # Pillow's JPEG "draft" flag
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


def _crop_box(w: int, h: int, size: int, rng: random.Random | None) -> tuple[float, float, float, float]:
    side = min(w, h)
    if rng is None:
        left, top = (w - side) / 2, (h - side) / 2
        return (left, top, left + side, top + side)
    left = rng.uniform((w - side) / 4, 3 * (w - side) / 4)
    top = rng.uniform((h - side) / 4, 3 * (h - side) / 4)
    target = rng.randint(size, size * 9 // 8)
    x, y = rng.randint(0, target - size), rng.randint(0, target - size)
    scale = side / target
    return (left + x * scale, top + y * scale, left + (x + size) * scale, top + (y + size) * scale)


def paper_crop(img: Image.Image, size: int, rng: random.Random | None) -> Image.Image:
    """The paper's augmentation: a square crop near the centre (offset uniform in the middle half
    of the slack), resize to a random side in [size, 9/8 size], random ``size`` crop; no flip.
    With ``rng=None``: centre square, resized to ``size`` (evaluation).

    Done as one antialiased bilinear resize of the final crop's box in source coordinates (the
    same pixels as resizing the square and then cropping, at a third of the cost of bicubic)."""
    return img.resize((size, size), Image.BILINEAR, box=_crop_box(img.width, img.height, size, rng))


def crop_tensor(img: Image.Image, size: int, rng: random.Random | None) -> torch.Tensor:
    """:func:`paper_crop` (same random draws) as a uint8 (3, size, size) tensor, resized by torch's
    uint8 antialiased bilinear kernel (SIMD, ~3x PIL's) from the crop box rounded to whole pixels."""
    w, h = img.size
    left, top, right, bottom = _crop_box(w, h, size, rng)
    x0, y0 = min(round(left), w - 1), min(round(top), h - 1)
    x1, y1 = min(max(round(right), x0 + 1), w), min(max(round(bottom), y0 + 1), h)
    if (x0, y0, x1, y1) != (0, 0, w, h):
        img = img.crop((x0, y0, x1, y1))  # a copy of the box only, before the bytes leave PIL
    hwc = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1, y1 - y0, x1 - x0, 3)
    chw = hwc.permute(0, 3, 1, 2)  # channels-last memory, what the uint8 SIMD kernel wants
    if chw.shape[-2:] == (size, size):
        return chw[0].contiguous()
    out = torch.nn.functional.interpolate(chw, size=(size, size), mode="bilinear", antialias=True)
    return out[0]  # channels-last strides: the batch's torch.stack makes it contiguous


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


def is_english(caption: str) -> bool:
    """py3langid's top language is English (its model ships in the wheel; nothing is downloaded)."""
    from py3langid.langid import classify

    return classify(caption)[0] == "en"


def _caption_of(value: Any) -> Any:
    if isinstance(value, dict):  # WebDataset .json
        return value.get("caption", value.get("text"))
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            raise BadSample("caption_not_utf8") from None
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
    caption = " ".join(caption.split())
    if cfg.english_only and not is_english(caption):
        raise BadSample("non_english")
    if image_col == CODES_COLUMN:
        codes = example.get(image_col)
        if not codes:
            raise BadSample("missing_codes")
        return torch.tensor(codes, dtype=torch.int64), caption
    need = -(-cfg.image_size * 9 // 8) if cfg.augment else cfg.image_size
    img = read_image(_image_bytes(example.get(image_col)), need, cfg.max_pixels, cfg.fast_jpeg)
    aspect = img.width / img.height
    if not cfg.min_aspect <= aspect <= cfg.max_aspect:
        raise BadSample("aspect_ratio")
    return crop_tensor(img, cfg.image_size, rng if cfg.augment else None), caption


# --- one worker's stream --------------------------------------------------------------------


def _shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """A shuffle buffer; its draws depend on the number of items only, not on their contents."""
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
        self.state = state  # slot -> position, counts and io at the last delivered batch
        self.source = _Source(cfg)

    def _items(self, slot: int, slots: int, start: tuple[int, int], io_counts: Counter):
        """(item, position after it) for this slot's shards from ``start`` = (shard, taken)."""
        n = self.source.num_shards
        order = list(range(n))
        random.Random(self.cfg.seed * 1_000_003 + self.epoch).shuffle(order)
        mine = order[slot::slots] if n >= slots else order
        first, skip = start
        for pos in range(first, len(mine)):
            if n < slots:  # every slot reads every shard, keeps every slots-th example of it

                def keep(i, pos=pos):
                    return (i + pos) % slots == slot
            else:

                def keep(i):
                    return True

            listing = pos == first and skip > 0  # resume inside this shard: list it, read what is left
            items = self.source.items(mine[pos], io_counts, None if listing else keep)
            seed = ((self.cfg.seed * 1_000_003 + self.epoch) * 65_537 + slot) * 1_000_003 + pos
            stream = _shuffled((it for it in items if keep(it.index)), self.cfg.shuffle_buffer, random.Random(seed))
            taken, nxt = 0, next(stream, None)
            while nxt is not None:
                item, nxt = nxt, next(stream, None)
                taken += 1
                if listing and taken <= skip:
                    continue
                yield item, ((pos, taken) if nxt is not None else (pos + 1, 0))

    def _batch(self, key: str, images: list, captions: list[str], slot: int, consumed: int, state: dict) -> dict:
        batch = {key: torch.stack(images), "caption": captions, "slot": slot, "state": state}
        if self.cfg.caption_encoder is not None:  # tokenized here, in the worker, not on the training loop
            # As a numpy array: pickled inline with the batch (a few KiB), not one more shared-memory
            # handle for the main process to receive.
            batch["text"] = self.cfg.caption_encoder(captions, (self.epoch, slot, consumed)).numpy()
        return batch

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        slot, slots = self.rank * self.workers + worker, self.world * self.workers
        saved = self.state.get(slot, {})
        counts, io_counts = Counter(saved.get("counts", {})), Counter(saved.get("io", {}))
        consumed = saved.get("consumed", 0)
        if "shard" in saved:
            position, replay = (saved["shard"], saved["in_shard"]), 0
        else:  # a checkpoint from before positions were saved: replay by count
            position, replay, consumed = (0, 0), consumed, 0
        seed = (self.cfg.seed * 1_000_003 + self.epoch) * 65_537 + slot
        aug = random.Random(seed + 1)
        key = self.source.key
        images, captions = [], []

        def state():
            return {"consumed": consumed, "shard": position[0], "in_shard": position[1], "counts": dict(counts),
                    "io": dict(io_counts)}  # fmt: skip

        for item, after in self._items(slot, slots, position, io_counts):
            consumed, position = consumed + 1, after
            if consumed <= replay:
                continue
            counts.update(item.extra)
            aug.seed(seed * 1_000_003 + consumed)  # augmentation a function of the example's position
            try:
                image, caption = process(item.fields(self.cfg), self.cfg, key, "caption", aug)
            except BadSample as bad:
                if bad.reason:
                    counts[bad.reason] += 1
                continue
            counts["samples"] += 1
            images.append(image)
            captions.append(caption)
            if len(images) == self.batch_size:
                yield self._batch(key, images, captions, slot, consumed, state())
                images, captions = [], []
        if images and self.cfg.drop_last:  # training: every batch has batch_size samples
            counts["dropped_tail_samples"] += len(images)
        elif images:
            yield self._batch(key, images, captions, slot, consumed, state())
        yield {"slot": slot, "state": state(), "end": True}


def _as_made(batch: dict) -> dict:
    """The DataLoader's collate step: batches leave the workers as they are made (its default would
    turn numpy arrays into tensors, each one more shared-memory handle to pass)."""
    return batch


class StreamLoader:
    """This rank's endless stream of batches ``{"image": uint8 (B, 3, S, S), "caption": [...]}`` (or
    ``"codes"`` (B, grid**2) for precomputed codes). Images stay uint8 until the trainer has moved
    them to its device (a quarter of the bytes through worker queues and host-to-device copies).

    ``state_dict()`` / ``load_state_dict()`` carry the position (epoch, every worker's shard and
    place in it, whose turn is next) and the bad-input counters through checkpoints. ``counters()``
    sums this rank's counts; ``io_counters()`` its ``bytes_read`` and ``shards_opened``.

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
        self.slots: dict[int, dict] = {}  # slot -> worker state at the last delivered batch
        self.past = Counter()  # counts of finished epochs (and epoch-end drops)
        self.past_io = Counter()
        self.turn: list[int] | None = None  # slots still delivering this epoch, the next one first
        self._it = None
        self._stash: dict[int, list[dict]] = {}

    # -- position ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        slots = json.loads(json.dumps(self.slots))
        return {"epoch": self.epoch, "slots": slots, "past": dict(self.past), "past_io": dict(self.past_io),
                "turn": self.turn}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.slots = {int(k): v for k, v in state["slots"].items()}
        self.past = Counter(state["past"])
        self.past_io = Counter(state.get("past_io", {}))
        self.turn = state.get("turn")
        self._it = None

    def counters(self) -> dict[str, int]:
        total = Counter(self.past)
        for saved in self.slots.values():
            total.update(saved["counts"])
        return dict(total)

    def io_counters(self) -> dict[str, int]:
        total = Counter(self.past_io)
        for saved in self.slots.values():
            total.update(saved.get("io", {}))
        return dict(total)

    # -- iteration --------------------------------------------------------------------------
    def _open_epoch(self):
        stream = _WorkerStream(
            self.cfg, self.batch_size, self.rank, self.world, self.num_workers, self.epoch, dict(self.slots)
        )
        loader = torch.utils.data.DataLoader(
            stream, batch_size=None, num_workers=self.num_workers, persistent_workers=False, collate_fn=_as_made
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
                self.slots[slot] = item["state"]
                self.turn.pop(0)
                continue
            self.turn = self.turn[1:] + [slot]
            return item
        return None

    def __iter__(self):
        from ..distributed import collectives as dd

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
                self.slots[item["slot"]] = item["state"]
                delivered += 1
                empty_epochs = 0
                out = {k: item[k] for k in ("image", "codes", "caption") if k in item}
                if "text" in item:
                    out["text"] = torch.from_numpy(item["text"])
                yield out
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
            self.past_io.update(saved.get("io", {}))
        self.slots = {}
        self.turn = None
        self.epoch += 1
