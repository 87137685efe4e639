"""Per-example isolation of bad input in WebDataset shards, heterogeneous shards, resume that seeks
(bytes read bounded), and the optional language filter."""

import io
import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from test_data import first_epoch, png

from dalle_ds.data import DataConfig, StreamLoader, iter_captions
from dalle_ds.data.synthetic import write_tar


def image(fmt="PNG", size=(24, 24), colour=(30, 160, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def good(i: int, ext="png", fmt="PNG") -> tuple[str, dict]:
    return f"{i:04d}", {ext: image(fmt), "txt": f"good example number {i}".encode()}


# Each bad kind once, between good examples: (members, the counter it goes to, whether its caption
# is delivered anyway).
BAD_KINDS = [
    ({"jpg": b"\xff\xd8\xff not a jpeg at all", "txt": b"corrupt image bytes here"}, "corrupt_image", False),
    ({"png": image("JPEG", (64, 64))[:300], "txt": b"truncated image bytes here"}, "corrupt_image", False),
    ({"png": b"", "txt": b"empty image bytes here"}, "empty_image", False),
    ({"png": image(), "txt": b"caption \xff\xfe not utf8 here"}, "caption_not_utf8", False),
    ({"png": image(), "txt": b"binary\x00\x01\x02 caption here"}, "binary_caption", False),
    ({"png": image(), "json": b"{not json at all"}, "bad_json", False),
    ({"png": image(), "json": json.dumps({"url": "x", "width": 3}).encode()}, "json_without_caption", False),
    ({"png": image()}, "missing_caption", False),
    ({"txt": b"caption without its image"}, "missing_image", False),
    ({"xyz": b"some payload"}, "unexpected_extension", False),
    ({"tiff": image("TIFF"), "txt": b"image of an unsupported type"}, "unexpected_extension", False),
    ({"png": image(), "txt": b"good example with an extra member", "exe": b"MZ"}, "unexpected_extension", True),
]


def bad_shard(path, first: int) -> tuple[list[str], dict]:
    """Good examples (png, jpg, webp, png bytes named .jpg) with every bad kind between them."""
    samples, delivered, counts = [], [], {}
    formats = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"), ("jpg", "PNG")]  # last: type != extension
    n = first
    for k, (members, reason, kept) in enumerate(BAD_KINDS):
        for _ in range(2):
            key, files = good(n, *formats[n % len(formats)])
            samples.append((key, files))
            delivered.append(f"good example number {n}")
            n += 1
        samples.append((f"bad{first}-{k:02d}", members))
        counts[reason] = counts.get(reason, 0) + 1
        if kept:
            delivered.append(members["txt"].decode())
    samples.append(good(n))
    delivered.append(f"good example number {n}")
    write_tar(path, samples)
    return delivered, counts


@pytest.mark.parametrize("workers", [0, 2])
def test_every_bad_member_kind_costs_only_itself(tmp_path, workers):
    want, counts = bad_shard(tmp_path / "a.tar", 0)
    want_b, counts_b = bad_shard(tmp_path / "b.tar", 1000)
    cfg = DataConfig(str(tmp_path), image_size=16, shuffle_buffer=4, augment=False)
    loader = StreamLoader(cfg, batch_size=1, num_workers=workers)
    got = first_epoch(loader)
    assert sorted(got) == sorted(want + want_b)
    expected = {k: counts.get(k, 0) + counts_b.get(k, 0) for k in {*counts, *counts_b}}
    expected["samples"] = len(want) + len(want_b)
    assert loader.state_dict()["past"] == expected
    # Captions only (tokenizer training): no image is read, so those of broken images come too.
    image_faults = [m["txt"].decode() for m, reason, _ in BAD_KINDS if reason in ("corrupt_image", "empty_image")]
    assert sorted(iter_captions(cfg)) == sorted(want + want_b + image_faults * 2)


def test_not_a_tar_and_a_truncated_tar_cost_only_what_cannot_be_read(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    whole = [good(i) for i in range(10)]
    write_tar(tmp_path / "whole.tar", whole)
    data = (tmp_path / "whole.tar").read_bytes()
    sizes = [len(f["png"]) for _, f in whole]
    # Members are a 512-byte header + data padded to 512: find the 7th example's image data.
    offset = 0
    for k in range(6):
        for payload in (sizes[k], len(whole[k][1]["txt"])):
            offset += 512 + -(-payload // 512) * 512
    (d / "cut_in_image.tar").write_bytes(data[: offset + 512 + 10])  # inside example 6's png
    (d / "cut_in_header.tar").write_bytes(data[: offset + 100])  # inside example 6's first header
    (d / "no_tar.tar").write_bytes(b"this is no tar file " * 40)
    (d / "empty.tar").write_bytes(b"")
    write_tar(d / "good.tar", [good(i) for i in range(100, 104)])
    cfg = DataConfig(str(d), image_size=16, shuffle_buffer=3, augment=False)
    loader = StreamLoader(cfg, batch_size=1)
    got = first_epoch(loader)
    first_six = [f"good example number {i}" for i in range(6)]
    assert sorted(got) == sorted(first_six * 2 + [f"good example number {i}" for i in range(100, 104)])
    assert loader.state_dict()["past"] == {"samples": 16, "truncated_shards": 2, "bad_shards": 2}


def test_heterogeneous_shards_stream_together(tmp_path):
    d = tmp_path / "mixed"
    d.mkdir()
    write_tar(d / "a_png_txt.tar", [good(i, "png", "PNG") for i in range(3)])
    write_tar(d / "b_jpg_txt.tar", [good(i, "jpg", "JPEG") for i in range(3, 6)])
    json_caps = [(f"{i}", {"jpeg": image("JPEG"), "json": json.dumps({"caption": f"good example number {i}"}).encode()})
                 for i in range(6, 9)]  # fmt: skip
    write_tar(d / "c_jpeg_json.tar", json_caps)
    write_tar(d / "d_webp_mixed.tar", [good(9, "webp", "WEBP"), good(10, "png", "PNG"), good(11, "jpg", "JPEG")])
    # Parquet files with different extra columns, in the same folder as the tars.
    for name, extra in (("e.parquet", {"width": [24, 24]}), ("f.parquet", {"url": ["u", "v"], "nsfw": [0.1, 0.2]})):
        start = 12 if name == "e.parquet" else 14
        table = {"jpg": [image("JPEG"), image("PNG")], "txt": [f"good example number {i}" for i in (start, start + 1)]}
        pq.write_table(pa.table({**table, **extra}), d / name)
    cfg = DataConfig(str(d), image_size=16, shuffle_buffer=2)
    got = first_epoch(StreamLoader(cfg, batch_size=1, num_workers=2))
    assert sorted(got) == sorted(f"good example number {i}" for i in range(16))
    # Parquet alone, differing schemas, with image structs in one file and bytes in the other.
    p = tmp_path / "pq"
    p.mkdir()
    pq.write_table(pa.table({"image": [{"bytes": png(), "path": None}], "caption": ["parquet caption one"],
                             "aesthetic": [5.5]}), p / "a.parquet")  # fmt: skip
    pq.write_table(pa.table({"image": [png()], "caption": ["parquet caption two"], "lang": ["en"]}), p / "b.parquet")
    got = first_epoch(StreamLoader(DataConfig(str(p), image_size=16, shuffle_buffer=1), batch_size=1))
    assert sorted(got) == ["parquet caption one", "parquet caption two"]


def write_big_shards(root, sizes, seed=0) -> dict[str, int]:
    """Shards of incompressible images (so a shard's bytes are mostly payload); caption -> shard."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    where, n = {}, 0
    for i, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            pixels = Image.frombytes("RGB", (32, 32), bytes(rng.getrandbits(8) for _ in range(32 * 32 * 3)))
            buf = io.BytesIO()
            pixels.save(buf, "PNG")
            samples.append((f"{n:06d}", {"png": buf.getvalue(), "txt": f"sample number {n}".encode()}))
            where[f"sample number {n}"] = i
            n += 1
        write_tar(root / f"part-{i:03d}.tar", samples)
    return where


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_skips_consumed_shards_and_rereads_at_most_one_shard_per_worker(tmp_path, workers):
    d = tmp_path / "d"
    where = write_big_shards(d, [6, 7, 5, 8, 6, 7, 5, 6])
    shard_bytes = max(p.stat().st_size for p in d.iterdir())
    cfg = DataConfig(str(d), image_size=16, shuffle_buffer=3, seed=5)
    full = StreamLoader(cfg, batch_size=2, num_workers=workers, epochs=1)
    whole = first_epoch(full)
    whole_io, whole_counts = full.io_counters(), full.state_dict()["past"]
    for stop in (5, 11):
        head_loader = StreamLoader(cfg, batch_size=2, num_workers=workers, epochs=1)
        head = []
        for _, batch in zip(range(stop), head_loader, strict=False):
            head += batch["caption"]
        state = json.loads(json.dumps(head_loader.state_dict()))
        # Shards consumed whole before the checkpoint are never opened again: spoil them.
        consumed = {s for s in set(where.values()) if all(c in head for c, t in where.items() if t == s)}
        assert consumed, "the checkpoint should come after at least one whole shard"
        saved = {s: (d / f"part-{s:03d}.tar").read_bytes() for s in consumed}
        for s in consumed:
            (d / f"part-{s:03d}.tar").write_bytes(b"spoilt" * 100)
        resumed = StreamLoader(cfg, batch_size=2, num_workers=workers, epochs=1)
        resumed.load_state_dict(state)
        tail = first_epoch(resumed)
        for s, data in saved.items():
            (d / f"part-{s:03d}.tar").write_bytes(data)
        assert head + tail == whole, stop
        assert resumed.state_dict()["past"] == whole_counts  # no bad shard: nothing spoilt was read
        io_total = resumed.io_counters()  # bytes before the checkpoint + bytes read after the resume
        extra = io_total["bytes_read"] - whole_io["bytes_read"]
        assert extra <= max(workers, 1) * shard_bytes, (stop, extra, shard_bytes)
        assert io_total["shards_opened"] <= whole_io["shards_opened"] + max(workers, 1)


def test_parquet_resume_inside_a_file(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    for f in range(3):
        rows = [f * 10 + i for i in range(9)]
        table = pa.table({"image": [png()] * 9, "caption": [f"parquet row {r}" for r in rows]})
        pq.write_table(table, d / f"{f}.parquet", row_group_size=4)
    cfg = DataConfig(str(d), image_size=16, shuffle_buffer=4, seed=2)
    whole = first_epoch(StreamLoader(cfg, batch_size=2))
    head_loader = StreamLoader(cfg, batch_size=2)
    head = []
    for _, batch in zip(range(6), head_loader, strict=False):
        head += batch["caption"]
    resumed = StreamLoader(cfg, batch_size=2)
    resumed.load_state_dict(json.loads(json.dumps(head_loader.state_dict())))
    assert head + first_epoch(resumed) == whole


def test_language_filter_is_optional_and_counted(tmp_path):
    captions = ["a red bicycle leaning against the wall", "ein rotes Fahrrad lehnt an der Wand",
                "a small dog running on the beach", "un petit chien qui court sur la plage",
                "a bowl of fresh fruit on the kitchen table", "una ciotola di frutta fresca sul tavolo"]  # fmt: skip
    write_tar(tmp_path / "a.tar", [(f"{i}", {"png": png(), "txt": c.encode()}) for i, c in enumerate(captions)])
    off = StreamLoader(DataConfig(str(tmp_path), image_size=16, shuffle_buffer=1), batch_size=1)
    assert sorted(first_epoch(off)) == sorted(captions)  # off by default
    cfg = DataConfig(str(tmp_path), image_size=16, shuffle_buffer=1, english_only=True)
    on = StreamLoader(cfg, batch_size=1)
    assert sorted(first_epoch(on)) == sorted(captions[0::2])
    assert on.state_dict()["past"] == {"samples": 3, "non_english": 3}
    assert sorted(iter_captions(cfg)) == sorted(captions[0::2])


def test_few_shards_slots_skip_examples_without_reading_them(tmp_path):
    write_big_shards(tmp_path / "few", [12])
    cfg = DataConfig(str(tmp_path / "few"), image_size=16, shuffle_buffer=4)
    loader = StreamLoader(cfg, batch_size=1, rank=0, world=2, num_workers=2, epochs=1)
    assert len(first_epoch(loader)) == 6  # 4 slots: this rank's 2 workers keep 3 examples each
    shard = (tmp_path / "few" / "part-000.tar").stat().st_size
    assert loader.io_counters()["bytes_read"] < shard  # 2 x (every header + a quarter of the payloads)


def test_trainer_flag_english_only_reaches_the_stream(tmp_path, single_process_group, dvae_dir):
    """``--english-only`` on the trainer's command line filters its stream (and its tokenizer's captions)."""
    from launching import shipped_config, train_args

    from dalle_ds.training import DalleRunConfig, DalleTrainer, parse_run_config

    captions = ["a red circle at the top left", "ein roter Kreis oben links"] * 4
    (tmp_path / "s").mkdir()
    write_tar(tmp_path / "s" / "a.tar", [(f"{i}", {"png": png(), "txt": c.encode()}) for i, c in enumerate(captions)])
    cfg = shipped_config(tmp_path, "cpu_zero2_fp32")
    extra = ("--data", tmp_path / "s", "--data-workers", 0, "--english-only")
    args = parse_run_config(DalleRunConfig, [str(a) for a in train_args(dvae_dir, tmp_path / "out", cfg, *extra)])
    trainer = DalleTrainer(args)
    assert trainer.stream.cfg.english_only
    seen = [c for step in range(2) for c in trainer.batch(step)["caption"]]
    assert set(seen) == {"a red circle at the top left"}
    assert trainer.stream.counters()["non_english"] >= 2


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_tokenize_with_dropout_that_a_resumed_stream_repeats(tmp_path, workers):
    """``caption_encoder``: batches carry ``text`` made in the data workers; BPE dropout is seeded by
    the batch's place in its worker's stream, so a resumed stream gets the same ids."""
    import pickle

    from dalle_ds import get_preset
    from dalle_ds.data.text import CaptionEncoder, encode_captions, train_tokenizer

    where = write_big_shards(tmp_path / "d", [6, 7, 5, 8])
    config = get_preset("dalle-tiny")
    tokenizer = train_tokenizer(list(where), 200)
    encoder = pickle.loads(pickle.dumps(CaptionEncoder(tokenizer, config, bpe_dropout=0.5, seed=3)))
    cfg = DataConfig(str(tmp_path / "d"), image_size=16, shuffle_buffer=3, caption_encoder=encoder)

    def texts(loader, n=None):
        return [(b["caption"], b["text"]) for _, b in zip(range(n or 10_000), loader, strict=False)]

    whole = texts(StreamLoader(cfg, batch_size=2, num_workers=workers, epochs=1))
    assert all(t.shape == (2, config.text_len) for _, t in whole)
    plain = [encode_captions(tokenizer, c, config) for c, _ in whole]
    assert any(not torch.equal(t, p) for (_, t), p in zip(whole, plain, strict=True))  # dropout is on
    again = texts(StreamLoader(cfg, batch_size=2, num_workers=workers, epochs=1))
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(whole, again, strict=True))
    head_loader = StreamLoader(cfg, batch_size=2, num_workers=workers, epochs=1)
    head = texts(head_loader, 5)
    resumed = StreamLoader(cfg, batch_size=2, num_workers=workers, epochs=1)
    resumed.load_state_dict(json.loads(json.dumps(head_loader.state_dict())))
    got = head + texts(resumed)
    assert len(got) == len(whole)
    assert all(a[0] == b[0] and torch.equal(a[1], b[1]) for a, b in zip(got, whole, strict=True))
