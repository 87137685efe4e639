"""Reading one shard: the examples of a WebDataset tar, a Parquet file or one shard of a
``datasets`` stream, in order, as items indexed 0, 1, ... Items are raw (bytes, not yet decoded)
and may be read lazily: a shard can be listed (tar headers, Parquet metadata) without reading the
examples, which are then read on first use. A shard-level failure is an item of its own, so the
sequence of indices depends on the shard's structure only.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import tarfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator

import numpy as np

from .config import (
    CAPTION_EXTENSIONS,
    CODES_COLUMN,
    IMAGE_EXTENSIONS,
    METADATA_EXTENSIONS,
    BadSample,
    DataConfig,
    _pick_columns,
)

BINARY = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


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
