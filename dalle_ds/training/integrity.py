"""Checkpoint integrity: the marker (``complete.json``) that records every file's size and the
SHA-256 of each 1 GiB piece of it, written after a save and checked before a load. The ranks hash
the pieces between them (each every world-th piece), so a large file (rank 0's 16-bit module at
ZeRO 1/2: 22 GiB at 12B parameters) is not one rank's work."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..distributed import collectives as dd

__all__ = ["COMPLETE", "FORMAT", "PIECE", "CheckpointError", "manifest", "piece_sha256", "read_marker", "verify_folder"]

COMPLETE = "complete.json"  # written into a checkpoint folder once every rank has finished it
FORMAT = 1  # complete.json's "format": the checkpoint layout this code writes (absent: written before it)
PIECE = 1 << 30  # bytes per SHA-256 in the marker: the ranks hash a large file's pieces at once
READ = 1 << 24  # bytes per read while hashing


class CheckpointError(RuntimeError):
    """No checkpoint can be resumed (the message lists what was checked), or one does not fit the run."""


def piece_sha256(path: Path, index: int) -> str:
    """SHA-256 of piece ``index`` of ``path``: bytes ``index * PIECE`` up to the next piece."""
    digest, left = hashlib.sha256(), PIECE
    with open(path, "rb") as f:
        f.seek(index * PIECE)
        while left and (block := f.read(min(READ, left))):
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def _pieces(size: int) -> int:
    return max(1, -(-size // PIECE))


def manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Every file of a checkpoint folder with its size and the SHA-256 of each of its pieces, the
    pieces hashed by the ranks between them (collective; the listing is rank 0's)."""
    listed = {n: (folder / n).stat().st_size for n in _listing(folder)} if dd.rank() == 0 else None
    sizes = dd.all_gather_object(listed)[0]
    pieces = [(n, i) for n, size in sizes.items() for i in range(_pieces(size))]
    digests = _shared_out(pieces, lambda piece: piece_sha256(folder / piece[0], piece[1]))
    return {n: {"size": size, "sha256": [digests[n, i] for i in range(_pieces(size))]} for n, size in sizes.items()}


def _listing(folder: Path) -> list[str]:
    """The files of a checkpoint folder (relative paths, sorted), the marker and temporaries left out."""
    names = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(n for n in names if n != COMPLETE and not n.rsplit("/", 1)[-1].startswith("."))


def _shared_out(items: list, check: Callable[[Any], Any]) -> dict[Any, Any]:
    """``check`` applied to this rank's share of ``items`` (every world-th from its rank), every
    rank's results merged (collective)."""
    mine = {item: check(item) for item in items[dd.rank() :: dd.world_size()]}
    merged: dict[str, Any] = {}
    for part in dd.all_gather_object(mine):
        merged.update(part)
    return merged


def read_marker(folder: Path) -> dict[str, Any] | str:
    """A checkpoint folder's marker, or what is wrong with it."""
    path = folder / COMPLETE
    if not path.is_file():
        return f"{path}: missing (the save did not complete)"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return f"{path}: unreadable ({err})"
    return data if isinstance(data, dict) else f"{path}: not a JSON object"


def verify_folder(folder: Path) -> list[str] | None:
    """What is wrong with the checkpoint in ``folder`` (one line per problem, naming the file); empty when
    every file has its recorded size and SHA-256, None when its marker predates checksums
    (collective: rank 0 reads the marker, the ranks hash the files between them)."""
    head = dd.all_gather_object(read_marker(folder) if dd.rank() == 0 else None)[0]
    if isinstance(head, str):
        return [head]
    if head.get("format", 0) > FORMAT:
        raise CheckpointError(
            f"{folder}: checkpoint format {head['format']}, written by a newer dalle-ds; this one reads "
            f"format {FORMAT} and older. Resume with the dalle-ds version that wrote it."
        )
    if "files" not in head:
        return None
    expected = head["files"]

    def check(piece: tuple[str, int]) -> str | None:
        (name, i), path, size = piece, folder / piece[0], expected[piece[0]]["size"]
        if not path.is_file():
            return f"{path}: missing"
        if path.stat().st_size != size:
            return f"{path}: {path.stat().st_size} bytes, {size} when saved (truncated or replaced)"
        if piece_sha256(path, i) != expected[name]["sha256"][i]:
            where = f" (bytes {i * PIECE} to {min(size, (i + 1) * PIECE)})" if size > PIECE else ""
            return f"{path}: contents differ from the SHA-256 recorded when saved{where}"
        return None

    pieces = [(n, i) for n in sorted(expected) for i in range(_pieces(expected[n]["size"]))]
    problems: dict[str, str] = {}
    for (name, _), problem in sorted(_shared_out(pieces, check).items()):
        if problem and name not in problems:
            problems[name] = problem
    return list(problems.values())
