"""Data sources and their shards (the unit dealt to the stream's slots), and every caption of a source.

Sources:

- WebDataset tar shards (``shards/*.tar``): read by :mod:`.shards` with :mod:`tarfile`, member by member;
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
"""

from __future__ import annotations

import glob
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

from .config import CAPTION_EXTENSIONS, CODES_COLUMN, IMAGE_EXTENSIONS, BadSample, DataConfig, _pick_columns
from .shards import _dataset_items, _first, _Item, _parquet_items, _tar_caption, _tar_items, _TarExample
from .transforms import _caption_of, caption_problem, is_english

__all__ = ["iter_captions", "open_source"]


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
