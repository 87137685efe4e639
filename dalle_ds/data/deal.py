"""Which shards each (rank, worker) slot of a stream reads in an epoch, and dealing what is left of an
epoch to another layout (a run resumed on another number of ranks or workers).

An epoch's shards are shuffled by seed (:mod:`.stream`) and dealt round-robin to the ``slots`` =
ranks x workers slots: slot ``s`` reads the shards at places ``s, s + slots, ...`` of the epoch's
order. With fewer shards than slots every slot reads every shard and keeps the examples ``i`` of the
one at place ``p`` with ``(i + p) % slots == s``. A slot's deal is a list of :class:`Piece`, its
position (piece, examples taken of it).
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import NamedTuple

__all__ = ["Piece", "redeal_stream_states", "slot_deal"]


class Piece(NamedTuple):
    """One shard as a slot reads it (a JSON list in a checkpoint). ``index``: its place in the epoch's
    shard order; ``slot``, ``pos``: the slot it was dealt to first and its place in that slot's deal,
    which seed its shuffle (whoever continues it replays the same one); ``taken``: its examples taken
    before it was dealt again; ``every``: the examples kept are those ``i`` with
    ``(i + pos) % every == slot % every`` (1: all of them)."""

    index: int
    slot: int
    pos: int
    taken: int = 0
    every: int = 1

    def keeps(self, i: int) -> bool:
        return (i + self.pos) % self.every == self.slot % self.every


def slot_deal(num_shards: int, slot: int, slots: int) -> list[Piece]:
    """Slot ``slot``'s shards of an epoch dealt over ``slots`` slots (see the module docstring)."""
    if num_shards < slots:  # every slot reads every shard, keeps every slots-th example of it
        return [Piece(p, slot, p, 0, slots) for p in range(num_shards)]
    return [Piece(index, slot, pos) for pos, index in enumerate(range(slot, num_shards, slots))]


def _left(saved: dict | None, slot: int, slots: int, num_shards: int) -> list[Piece]:
    """What a slot still has to read this epoch, from its saved state (None: it has not begun)."""
    if saved is None:
        return slot_deal(num_shards, slot, slots)
    if "shard" not in saved:
        raise ValueError(f"stream slot {slot} was saved as a count of examples only: resume on the same layout")
    deal = [Piece(*p) for p in saved["deal"]] if "deal" in saved else slot_deal(num_shards, slot, slots)
    left = deal[saved["shard"] :]
    if left:
        left[0] = left[0]._replace(taken=max(saved["in_shard"], left[0].taken))
    return left


def _old_workers(states: list[dict]) -> int | None:
    """Workers per rank of the layout that saved ``states``; None when no rank has begun its epoch."""
    found = set()
    for rank, state in enumerate(states):
        if state.get("turn") is None:
            if state["slots"]:
                raise ValueError(f"rank {rank}'s stream state has no turn (saved by an older version)")
            continue
        slots = sorted({int(s) for s in state["slots"]} | set(state["turn"]))
        found.add(len(slots))
        if slots != list(range(rank * len(slots), (rank + 1) * len(slots))):
            raise ValueError(f"rank {rank}'s stream state holds slots {slots}, not a rank's consecutive ones")
    if len(found) > 1:
        raise ValueError(f"the stream states disagree on the workers per rank: {sorted(found)}")
    return found.pop() if found else None


def _summed(states: list[dict], key: str) -> dict:
    total: Counter = Counter()
    for state in states:
        total.update(state.get(key, {}))
    return dict(total)


def redeal_stream_states(states: list[dict], world: int, workers: int) -> list[dict]:
    """Every old rank's ``StreamLoader.state_dict()`` (in rank order), re-dealt to ``world`` ranks of
    ``workers`` data workers: one state per new rank, for ``StreamLoader(..., rank=r, world=world,
    num_workers=workers).load_state_dict(states[r])``.

    Over the change every example of the epoch is delivered once: consumed shards stay consumed; a
    partly read shard goes to one new slot, which lists it, replays its shuffle (seeded by the old
    slot and place) and delivers what the old slot had not; the unstarted shards are dealt to the
    new slots. Partly read shards are dealt first, then the unstarted ones in the epoch's order,
    round-robin over the new slots (``rank * max(workers, 1) + worker``); with fewer shards than old
    slots, each old slot's share of a shard (every ``old slots``-th example) is dealt as one piece.
    Old slot ``s``'s counters (bad input, ``samples``, ``io``, examples consumed) go to new slot
    ``s % new slots``, old rank ``r``'s finished epochs to new rank ``r % world``, so the totals over
    all ranks carry over. At an epoch boundary, past the end, or when no batch of the epoch was
    delivered, the epoch is dealt afresh on the new layout. The same layout gives the states as
    they are. Raises ValueError for states that disagree on the epoch or the layout, or that were
    saved mid-epoch by a version that did not record the number of shards.
    """
    if not states:
        raise ValueError("no stream states to re-deal")
    epochs = sorted({state["epoch"] for state in states})
    if len(epochs) > 1:
        raise ValueError(f"the stream states are at different epochs: {epochs}")
    old_workers, new_workers = _old_workers(states), max(workers, 1)
    if len(states) == world and old_workers in (None, new_workers):
        return copy.deepcopy(states)
    out = [
        {"epoch": epochs[0], "slots": {}, "turn": None, "num_shards": None,
         "past": _summed(states[r::world], "past"), "past_io": _summed(states[r::world], "past_io")}
        for r in range(world)
    ]  # fmt: skip
    saved = {int(slot): s for state in states for slot, s in state["slots"].items()}
    if not saved:
        return out
    num_shards = {state.get("num_shards") for state in states if state["slots"]}
    if len(num_shards) > 1 or None in num_shards:
        raise ValueError(
            f"mid-epoch stream states with numbers of shards {sorted(num_shards, key=str)}: re-dealing needs "
            "the one number (states saved by an older version resume on the same layout or from an epoch boundary)"
        )
    (n,) = num_shards
    old_slots, new_slots = len(states) * old_workers, world * new_workers
    running = set()  # slots that had not finished the epoch (a rank yet to begin it: all of its own)
    for rank, state in enumerate(states):
        turn = state.get("turn")
        running.update(range(rank * old_workers, (rank + 1) * old_workers) if turn is None else turn)
    left = [piece for slot in sorted(running) for piece in _left(saved.get(slot), slot, old_slots, n)]
    left.sort(key=lambda p: (p.taken == 0, p.index, p.slot))  # partly read ones first
    slots = {
        j: {"consumed": 0, "shard": 0, "in_shard": 0, "deal": [list(p) for p in left[j::new_slots]],
            "counts": Counter(), "io": Counter()}
        for j in range(new_slots)
    }  # fmt: skip
    for slot, state in saved.items():
        new = slots[slot % new_slots]
        new["consumed"] += state.get("consumed", 0)
        new["counts"].update(state.get("counts", {}))
        new["io"].update(state.get("io", {}))
    for rank, state in enumerate(out):
        mine = range(rank * new_workers, (rank + 1) * new_workers)
        state["slots"] = {str(j): {**slots[j], "counts": dict(slots[j]["counts"]), "io": dict(slots[j]["io"])}
                          for j in mine}  # fmt: skip
        state["turn"], state["num_shards"] = list(mine), n
    return out
