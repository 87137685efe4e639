"""A stream's position survives a change of layout (ranks x workers): stopped mid-epoch, re-dealt with
``redeal_stream_states`` and continued, every example of the epoch is delivered once and the counters
of the uninterrupted run carry over; the same layout resumes as before. Ranks are simulated in one
process: loaders of different ``rank`` without a process group each run until their own workers are
dry."""

import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data import png

from dalle_ds.data import DataConfig, StreamLoader, redeal_stream_states
from dalle_ds.data.deal import Piece, slot_deal
from dalle_ds.data.synthetic import write_tar

IO = ("bytes_read", "shards_opened")


def shards(root, sizes, kind: str) -> list[str]:
    """Tar or Parquet shards of uniquely captioned examples; every 4th is bad (a corrupt image, then
    a blank caption, in turn). Returns the good captions."""
    root.mkdir(parents=True, exist_ok=True)
    image, good, n = png(), [], 0
    for s, size in enumerate(sizes):
        rows = []
        for _ in range(size):
            caption = f"example number {n}"
            if n % 4 == 3:
                rows.append((b"not an image", caption) if n % 8 == 3 else (image, "   "))
            else:
                rows.append((image, caption))
                good.append(caption)
            n += 1
        if kind == "tar":
            write_tar(root / f"{s:03d}.tar", [(f"{s:03d}-{i:03d}", {"png": im, "txt": c.encode()})
                                              for i, (im, c) in enumerate(rows)])  # fmt: skip
        else:
            table = pa.table({"image": [im for im, _ in rows], "caption": [c for _, c in rows]})
            pq.write_table(table, root / f"{s:03d}.parquet", row_group_size=3)
    return good


def loaders(cfg: DataConfig, world: int, workers: int) -> list[StreamLoader]:
    return [StreamLoader(cfg, batch_size=1, rank=r, world=world, num_workers=workers, epochs=1) for r in range(world)]


def take(loader: StreamLoader, batches: int | None = None) -> list[str]:
    """Captions of the loader's next ``batches`` batches (None: to the end of its epochs)."""
    out = []
    for _, batch in zip(range(batches if batches is not None else 1 << 30), loader, strict=False):
        out += batch["caption"]
    return out


def totals(ranks: list[StreamLoader]) -> Counter:
    total = Counter()
    for loader in ranks:
        total.update({k: v for k, v in loader.counters().items() if k not in IO})
    return total


def saved(ranks: list[StreamLoader]) -> list[dict]:
    return [json.loads(json.dumps(loader.state_dict())) for loader in ranks]  # as stored in a checkpoint


def left_kinds(states: list[dict]) -> set[str]:
    """Which kinds of shards a stop leaves: consumed, partly read, unstarted."""
    kinds = set()
    for state in states:
        slots = len(states) * len(set(state["turn"]) | set(map(int, state["slots"])))
        for slot, s in state["slots"].items():
            deal = s["deal"] if "deal" in s else slot_deal(state["num_shards"], int(slot), slots)
            kinds |= {"consumed"} if s["shard"] else set()
            kinds |= {"partly read"} if s["in_shard"] else set()
            kinds |= {"unstarted"} if s["shard"] + (s["in_shard"] > 0) < len(deal) else set()
    return kinds


CASES = {  # (shard sizes, layouts (ranks, workers) in turn, batches per rank before each change)
    "tar 2x2 to 1x1": ("tar", [5, 6, 4, 7, 5, 6, 4, 5, 6, 7], [(2, 2), (1, 1)], [9]),
    "tar 1x1 to 2x2": ("tar", [5, 6, 4, 7, 5, 6, 4, 5, 6, 7], [(1, 1), (2, 2)], [13]),
    "parquet 2x2 to 1x1": ("parquet", [5, 6, 4, 7, 5, 6, 4, 5, 6, 7], [(2, 2), (1, 1)], [9]),
    "parquet 1x1 to 2x2": ("parquet", [5, 6, 4, 7, 5, 6, 4, 5, 6, 7], [(1, 1), (2, 2)], [13]),
    "tar 2x2 to 1x1 to 2x2": ("tar", [5, 6, 4, 7, 5, 6, 4, 5, 6, 7], [(2, 2), (1, 1), (2, 2)], [9, 7]),
    "fewer shards than slots": ("tar", [9, 11], [(2, 2), (1, 1)], [2]),
}


@pytest.mark.parametrize("case", CASES)
def test_every_example_once_and_the_counters_carry_over_a_change_of_layout(tmp_path, case):
    kind, sizes, layouts, stops = CASES[case]
    good = shards(tmp_path / "d", sizes, kind)
    cfg = DataConfig(str(tmp_path / "d"), image_size=16, shuffle_buffer=3, seed=7)
    whole = loaders(cfg, *layouts[0])
    assert Counter(c for loader in whole for c in take(loader)) == Counter(good)
    ranks, delivered = loaders(cfg, *layouts[0]), []
    for stop, (world, workers) in zip(stops, layouts[1:], strict=True):
        delivered += [c for loader in ranks for c in take(loader, stop)]
        states = saved(ranks)
        if len(sizes) >= len(states) * len(states[0]["turn"]):
            assert left_kinds(states) == {"consumed", "partly read", "unstarted"}
        io = sum((Counter(loader.io_counters()) for loader in ranks), Counter())
        ranks = loaders(cfg, world, workers)
        for loader, state in zip(ranks, redeal_stream_states(states, world, workers), strict=True):
            loader.load_state_dict(state)
        assert sum((Counter(loader.io_counters()) for loader in ranks), Counter()) == io
    delivered += [c for loader in ranks for c in take(loader)]
    assert Counter(delivered) == Counter(good)  # each example of the epoch exactly once
    assert totals(ranks) == totals(whole)  # samples and every bad-input count
    assert totals(ranks)["samples"] == len(good) and totals(ranks)["corrupt_image"] > 0


def test_the_same_layout_resumes_as_before(tmp_path):
    shards(tmp_path / "d", [5, 6, 4, 7, 5, 6], "tar")
    cfg = DataConfig(str(tmp_path / "d"), image_size=16, shuffle_buffer=3, seed=7)
    whole = [take(loader) for loader in loaders(cfg, 2, 2)]
    heads = loaders(cfg, 2, 2)
    head = [take(loader, 5) for loader in heads]
    states = saved(heads)
    redealt = redeal_stream_states(states, 2, 2)
    assert redealt == states
    for r, loader in enumerate(loaders(cfg, 2, 2)):
        loader.load_state_dict(redealt[r])
        assert head[r] + take(loader) == whole[r]


def test_at_an_epoch_boundary_the_next_epoch_is_dealt_on_the_new_layout():
    states = [{"epoch": 3, "slots": {}, "past": {"samples": 10 + r}, "past_io": {"bytes_read": r}, "turn": None}
              for r in range(4)]  # fmt: skip
    new = redeal_stream_states(states, 3, 2)
    assert [s["epoch"] for s in new] == [3, 3, 3] and all(s["slots"] == {} and s["turn"] is None for s in new)
    assert sum(s["past"]["samples"] for s in new) == 46 and sum(s["past_io"].get("bytes_read", 0) for s in new) == 6


def test_pieces_and_states_it_cannot_redeal():
    assert slot_deal(10, 1, 4) == [Piece(1, 1, 0), Piece(5, 1, 1), Piece(9, 1, 2)]
    assert slot_deal(2, 3, 4) == [Piece(0, 3, 0, 0, 4), Piece(1, 3, 1, 0, 4)]
    assert [i for i in range(8) if Piece(1, 3, 1, 0, 4).keeps(i)] == [2, 6]
    slot = {"consumed": 2, "shard": 0, "in_shard": 2, "counts": {"samples": 2}, "io": {}}
    old = {"epoch": 0, "slots": {"0": slot}, "past": {}, "turn": [0]}  # saved without the number of shards
    with pytest.raises(ValueError, match="numbers of shards"):
        redeal_stream_states([old, {**old, "slots": {}, "turn": [1]}], 1, 1)
    with pytest.raises(ValueError, match="different epochs"):
        redeal_stream_states([old, {**old, "epoch": 1}], 1, 1)
