"""Streaming image-text data for many nodes, ranks and workers.

The pieces: :mod:`.config` (DataConfig, the bad-input counters), :mod:`.sources` and
:mod:`.shards` (what a source's shards are and how one is read), :mod:`.transforms` (one example to
a tensor), :mod:`.deal` (which shards a slot reads); this module shuffles, batches and resumes.

Distribution. The stream's shards (files) are shuffled per epoch by seed and dealt round-robin to
the (rank, worker) slots (:mod:`.deal`), so every slot reads a disjoint part and together they read
everything. With fewer shards than slots every slot reads every shard and keeps every ``slots``-th
example (the others are skipped without reading their bytes). Examples are shuffled within each shard
(a buffer of ``shuffle_buffer``, seeded per shard), so a position is (shard, examples taken from it).
Uneven shards give ranks uneven example counts; :class:`StreamLoader` ends an epoch on every rank
as soon as one rank runs dry (one all-reduce of a flag per batch, on the CPU group), so collectives never hang.

Resume. Each worker's stream is a pure function of (seed, epoch, slot). The loader records each
worker's position when its last delivered batch was made: the index of the current shard in its
shard order and how many of that shard's examples it had taken. A resumed worker does not open the
shards before it; it lists the current shard (tar headers / Parquet metadata), replays that shard's
shuffle on the list, and reads only the examples still to come (seeking to them). The resumed stream
equals the uninterrupted one; the extra bytes read are at most one shard per worker. On another
layout (ranks x workers), :func:`.deal.redeal_stream_states` deals what is left of the epoch to the
new slots as explicit lists of shards, each with the seed of its shuffle and the examples taken of
it. Bad input is skipped and counted (:data:`.config.REASONS`).

Workers. One DataLoader serves the whole run with persistent workers: each epoch restarts their
streams in place (the epoch number reaches them through a shared-memory tensor), so a worker process,
its imports and its tokenizer live from the first batch to the last.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import threading
from collections import Counter
from collections.abc import Iterator

import torch

from ..utils.seeding import derive_seed
from .config import BadSample, DataConfig
from .deal import Piece, slot_deal
from .sources import _Source
from .transforms import process

__all__ = ["StreamLoader"]

# derive_seed domains (the key after the run's seed) of this module's draws; the trainer keys 0-2 with
# the same seed (noise, map-style data order, BPE dropout) and the synthetic set 6.
_SHARD_ORDER = 3  # (epoch): the order the shards are dealt to the slots in
_SHUFFLE = 4  # (epoch, slot, shard position): the shuffle buffer of one of a slot's shards
_AUGMENT = 5  # (epoch, slot, examples consumed): one example's crop


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
    """Batches of one (rank, worker) slot for one epoch, the epoch ``epoch[0]`` holds when an
    iteration starts; see the module docstring."""

    def __init__(self, cfg: DataConfig, batch_size: int, rank: int, world: int, workers: int, epoch, start, state):
        super().__init__()
        self.cfg, self.batch_size = cfg, batch_size
        self.rank, self.world, self.workers = rank, world, max(workers, 1)
        self.epoch = epoch  # shared-memory int64 (1,): set by the loader before each epoch's iteration
        self.start, self.state = start, state  # slot -> position, counts and io saved in epoch `start`
        self.source = _Source(cfg)

    def _items(self, epoch: int, deal: list[Piece], start: tuple[int, int], io_counts: Counter):
        """(item, position after it) for this slot's deal from ``start`` = (piece, taken)."""
        order = list(range(self.source.num_shards))
        random.Random(derive_seed(self.cfg.seed, _SHARD_ORDER, epoch)).shuffle(order)
        first, skip_first = start
        for k in range(first, len(deal)):
            piece = deal[k]
            skip = max(skip_first if k == first else 0, piece.taken)
            listing = skip > 0  # resume inside this shard: list it, read what is left
            items = self.source.items(order[piece.index], io_counts, None if listing else piece.keeps)
            rng = random.Random(derive_seed(self.cfg.seed, _SHUFFLE, epoch, piece.slot, piece.pos))
            stream = _shuffled((it for it in items if piece.keeps(it.index)), self.cfg.shuffle_buffer, rng)
            taken, nxt = 0, next(stream, None)
            while nxt is not None:
                item, nxt = nxt, next(stream, None)
                taken += 1
                if taken <= skip:
                    continue
                yield item, ((k, taken) if nxt is not None else (k + 1, 0))

    def _batch(self, key: str, images: list, captions: list[str], where: tuple[int, int, int], state: dict) -> dict:
        batch = {key: torch.stack(images), "caption": captions, "slot": where[1], "state": state}
        if self.cfg.caption_encoder is not None:  # tokenized here, in the worker, not on the training loop
            # As a numpy array: pickled inline with the batch (a few KiB), not one more shared-memory
            # handle for the main process to receive.
            batch["text"] = self.cfg.caption_encoder(captions, where).numpy()
        return batch

    def __iter__(self):
        epoch = int(self.epoch[0])  # read now: a persistent worker makes the next epoch's iterator early
        return self._stream(epoch, self.state if epoch == self.start else {})

    def _stream(self, epoch: int, positions: dict):
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        slot, slots = self.rank * self.workers + worker, self.world * self.workers
        saved = positions.get(slot, {})
        counts, io_counts = Counter(saved.get("counts", {})), Counter(saved.get("io", {}))
        consumed = saved.get("consumed", 0)
        deal = [Piece(*p) for p in saved["deal"]] if "deal" in saved else slot_deal(self.source.num_shards, slot, slots)
        if "shard" in saved:
            position, replay = (saved["shard"], saved["in_shard"]), 0
        else:  # a checkpoint from before positions were saved: replay by count
            position, replay, consumed = (0, 0), consumed, 0
        aug = random.Random(0)  # reseeded for every example
        key = self.source.key
        images, captions = [], []

        def state():
            return {"consumed": consumed, "shard": position[0], "in_shard": position[1], "counts": dict(counts),
                    "io": dict(io_counts)}  # fmt: skip

        for item, after in self._items(epoch, deal, position, io_counts):
            consumed, position = consumed + 1, after
            if consumed <= replay:
                continue
            counts.update(item.extra)
            aug.seed(derive_seed(self.cfg.seed, _AUGMENT, epoch, slot, consumed))  # a function of the position
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
                yield self._batch(key, images, captions, (epoch, slot, consumed), state())
                images, captions = [], []
        if images and self.cfg.drop_last:  # training: every batch has batch_size samples
            counts["dropped_tail_samples"] += len(images)
        elif images:
            yield self._batch(key, images, captions, (epoch, slot, consumed), state())
        yield {"slot": slot, "state": state(), "end": True}


def _leave_job_signals_to_the_rank(rank_pid: int, worker_id: int) -> None:
    """Each data worker's ``worker_init_fn`` (``rank_pid``: the process that made the DataLoader).
    SIGTERM and SIGUSR1 sent to every process of a job (by SLURM, a process-group kill, DeepSpeed's
    launcher stopping a rank's process tree) are the rank's to act on: it saves and exits, and its
    workers with it (``training/preemption.py``). Torch's worker would die of them, and the rank's
    DataLoader would then raise at once. Here a thread takes them instead; a SIGTERM from the rank
    itself (multiprocessing stopping daemonic workers at exit) still ends the worker."""
    job_signals = {signal.SIGTERM, signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, job_signals)  # threads started later inherit the mask

    def take() -> None:
        while True:
            info = signal.sigwaitinfo(job_signals)
            if info.si_signo == signal.SIGTERM and info.si_pid == rank_pid:
                os._exit(0)

    threading.Thread(target=take, name="job-signals", daemon=True).start()


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

    The worker processes persist across epochs (one DataLoader per loader, made again only by
    ``load_state_dict``); when an epoch ends early (another rank ran dry) the batches its workers had
    prefetched are discarded as the next epoch starts.
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
        self.num_shards: int | None = None  # the source's, known once an epoch is opened (or loaded)
        self._loader: torch.utils.data.DataLoader | None = None  # made at the first epoch this loader opens
        self._epoch_box: torch.Tensor | None = None  # the workers' view of self.epoch (shared memory)
        self._it = None
        self._stash: dict[int, list[dict]] = {}

    # -- position ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        slots = json.loads(json.dumps(self.slots))
        return {"epoch": self.epoch, "slots": slots, "past": dict(self.past), "past_io": dict(self.past_io),
                "turn": self.turn, "num_shards": self.num_shards}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.slots = {int(k): v for k, v in state["slots"].items()}
        self.past = Counter(state["past"])
        self.past_io = Counter(state.get("past_io", {}))
        self.turn = state.get("turn")
        self.num_shards = state.get("num_shards")
        self._loader = self._it = None  # workers that knew the old positions exit

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
        if self._loader is None:  # positions in self.slots belong to this epoch, the first one it opens
            self._epoch_box = torch.zeros(1, dtype=torch.int64).share_memory_()
            stream = _WorkerStream(self.cfg, self.batch_size, self.rank, self.world, self.num_workers,
                                   self._epoch_box, self.epoch, dict(self.slots))  # fmt: skip
            if self.slots and self.num_shards not in (None, stream.source.num_shards):
                raise ValueError(f"the saved stream position is in {self.num_shards} shards; {self.cfg.source!r} "
                                 f"has {stream.source.num_shards}")  # fmt: skip
            self.num_shards = stream.source.num_shards
            self._loader = torch.utils.data.DataLoader(
                stream, batch_size=None, num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                collate_fn=_as_made, worker_init_fn=functools.partial(_leave_job_signals_to_the_rank, os.getpid()),
            )  # fmt: skip
        if self.turn is None:
            workers = max(self.num_workers, 1)
            self.turn = [self.rank * workers + w for w in range(workers)]
        self._stash = {slot: [] for slot in self.turn}
        self._epoch_box[0] = self.epoch  # before iter(): it restarts the workers' streams, which read it
        return iter(self._loader)

    def _next_local(self) -> dict | None:
        """The next full batch from this rank's workers, or None when all of them are done."""
        while self.turn:
            slot = self.turn[0]
            while not self._stash[slot]:
                item = next(self._it, None)
                if item is None:
                    raise RuntimeError(f"data worker for slot {slot} stopped without its end marker")
                if item["slot"] in self._stash:  # else the repeated end marker of a worker that had
                    self._stash[item["slot"]].append(item)  # finished before a resume: counted already
            item = self._stash[slot].pop(0)
            if item.get("end"):  # this worker is done: keep its final counts, drop it from the turn
                self._record(slot, item["state"])
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
                resumed = bool(self.slots)  # inside this epoch (from a checkpoint): it may have nothing left
                self._it = self._open_epoch()
                delivered = 0
            item = self._next_local()
            have = 0 if item is None else 1
            if joined:  # every rank ends the epoch together (uneven shards must not hang collectives)
                have = dd.host_all_reduce(have, op="min", dtype=torch.int32)
            if have:
                self._record(item["slot"], item["state"])
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
            if delivered or not resumed:
                empty_epochs = 0 if delivered else empty_epochs + 1
            if empty_epochs >= 2 or (empty_epochs and self.epochs is not None):
                raise RuntimeError(
                    f"data source {self.cfg.source!r} gave no complete batch of {self.batch_size} on rank "
                    f"{self.rank} for a whole epoch; bad-input counts: {self.counters()}"
                )
        self._loader = None  # the last epoch is done: its workers exit

    def _record(self, slot: int, state: dict) -> None:
        """A worker's state at a delivered batch; a re-dealt slot's deal stays here (workers report positions)."""
        deal = self.slots.get(slot, {}).get("deal")
        self.slots[slot] = state if deal is None else {**state, "deal": deal}

    def _finish_epoch(self) -> None:
        self._it = None  # the workers stay: the next iter() restarts their streams in the next epoch
        for saved in self.slots.values():
            self.past.update(saved["counts"])
            self.past_io.update(saved.get("io", {}))
        self.slots = {}
        self.turn = None
        self.epoch += 1
