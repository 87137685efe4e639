"""Streaming data: sharding over ranks x workers, equal batches with uneven shards, exact resume,
bad input skipped and counted, image modes and the paper's crop, tokenizer and synthetic shards."""

import io
import json
import os
import random
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, free_port
from PIL import Image

from dalle_ds.data import DataConfig, StreamLoader, caption_problem, paper_crop, read_image, to_rgb
from dalle_ds.data.synthetic import read_attributes, write_tar, write_webdataset


def png(size=(24, 24), colour=(200, 30, 30), mode="RGB", fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, fmt)
    return buf.getvalue()


def numbered_shards(root, sizes) -> list[str]:
    """Shards of uniquely captioned samples ("sample number N"); shard i holds sizes[i] samples."""
    root.mkdir(parents=True, exist_ok=True)
    n, names = 0, []
    image = png()
    for i, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            samples.append((f"{n:06d}", {"png": image, "txt": f"sample number {n}".encode()}))
            n += 1
        write_tar(root / f"part-{i:03d}.tar", samples)
        names.append(str(root / f"part-{i:03d}.tar"))
    return names


def first_epoch(loader: StreamLoader) -> list[str]:
    seen = []
    for batch in loader:
        if loader.epoch != 0:
            break
        seen += batch["caption"]
    return seen


def test_ranks_and_workers_read_disjoint_parts_that_cover_everything(tmp_path):
    numbered_shards(tmp_path / "d", [5, 6, 7, 8, 5, 6, 7, 8])
    cfg = DataConfig(str(tmp_path / "d"), image_size=16, shuffle_buffer=4)
    parts = [first_epoch(StreamLoader(cfg, batch_size=1, rank=r, world=2, num_workers=2)) for r in range(2)]
    everything = [f"sample number {i}" for i in range(52)]
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(everything)
    # Fewer shards than slots: every slot reads every shard, keeps every 4th example.
    numbered_shards(tmp_path / "few", [9])
    cfg = DataConfig(str(tmp_path / "few"), image_size=16, shuffle_buffer=4)
    parts = [first_epoch(StreamLoader(cfg, batch_size=1, rank=r, world=2, num_workers=2)) for r in range(2)]
    assert sorted(parts[0] + parts[1]) == sorted(f"sample number {i}" for i in range(9))


def _uneven_worker(rank, world, port, root, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    loader = StreamLoader(DataConfig(root, image_size=16, shuffle_buffer=2), batch_size=2, rank=rank, world=world)
    epochs = []
    for _, _batch in zip(range(12), loader, strict=False):
        epochs.append(loader.epoch)
        dist.all_reduce(torch.ones(1))  # a collective per step, as training does: must never hang
    out[rank] = (epochs, loader.counters())
    dist.destroy_process_group()


def test_uneven_shards_give_every_rank_the_same_batches_per_epoch(tmp_path):
    # 2 shards of 10 and 2: whichever rank gets the big one has 5 batches, the other 1.
    numbered_shards(tmp_path / "d", [10, 2])
    out = mp.Manager().dict()
    mp.spawn(_uneven_worker, args=(2, free_port(), str(tmp_path / "d"), out), nprocs=2, join=True)
    (epochs0, counts0), (epochs1, counts1) = out[0], out[1]
    assert epochs0 == epochs1  # both ranks step through epochs in lockstep
    per_epoch = Counter(epochs0)
    assert per_epoch[0] == 1 and per_epoch[1] == 1  # the short rank's one batch bounds each epoch
    dropped = counts0.get("dropped_at_epoch_end", 0) + counts1.get("dropped_at_epoch_end", 0)
    assert dropped > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_without_repeats_or_gaps(tmp_path, workers):
    numbered_shards(tmp_path / "d", [7, 9, 6, 8])
    cfg = DataConfig(str(tmp_path / "d"), image_size=16, shuffle_buffer=5, seed=3)
    whole = first_epoch(StreamLoader(cfg, batch_size=2, num_workers=workers))
    loader = StreamLoader(cfg, batch_size=2, num_workers=workers)
    head = []
    for _, batch in zip(range(3), loader, strict=False):  # odd: worker 1 is next after resume
        head += batch["caption"]
    state = json.loads(json.dumps(loader.state_dict()))  # as stored in a checkpoint
    resumed = StreamLoader(cfg, batch_size=2, num_workers=workers)
    resumed.load_state_dict(state)
    tail = first_epoch(resumed)
    assert not set(head) & set(tail)
    assert sorted(head + tail) == sorted(whole)
    assert head + tail == whole  # the same batches in the same order


def test_bad_input_is_skipped_and_counted(tmp_path):
    good = png()
    rgba = png(mode="RGBA", colour=(0, 0, 255, 0))
    big = png(size=(1200, 1000))
    truncated = png(size=(64, 64), fmt="PNG")[:60]
    samples = [
        ("00", {"png": good, "txt": b"a fine red square"}),
        ("01", {"png": b"\xff\xd8 not a jpeg at all", "txt": b"a broken picture here"}),
        ("02", {"png": truncated, "txt": b"a truncated picture here"}),
        ("03", {"png": good, "txt": b"   "}),
        ("04", {"png": good, "txt": b"IMG_1234.jpg"}),
        ("05", {"png": good, "txt": b"dog"}),
        ("06", {"png": png(size=(90, 30)), "txt": b"a very wide banner"}),
        ("07", {"png": big, "txt": b"a decompression bomb here"}),
        ("08", {"png": rgba, "txt": b"a transparent square here"}),
        ("09", {"png": png(mode="L", colour=128), "txt": b"a grey square here"}),
        ("10", {"png": png(mode="CMYK", colour=(0, 255, 255, 0), fmt="JPEG"), "txt": b"a cmyk red square"}),
        ("11", {"png": png(mode="I;16", colour=65535), "txt": b"a sixteen bit square"}),
        ("12", {"png": png(mode="P", colour=3), "txt": b"a palette square here"}),
    ]  # one set of extensions per WebDataset (datasets infers the columns from the first samples)
    write_tar(tmp_path / "a.tar", samples)
    (tmp_path / "b.tar").write_bytes(b"this is no tar file " * 40)  # an unreadable shard
    cfg = DataConfig(str(tmp_path), image_size=16, max_pixels=1_000_000, shuffle_buffer=1, augment=False)
    loader = StreamLoader(cfg, batch_size=1)
    got = first_epoch(loader)
    assert sorted(got) == sorted(
        ["a fine red square", "a transparent square here", "a grey square here", "a cmyk red square"]
        + ["a sixteen bit square", "a palette square here"]
    )
    counts = loader.state_dict()["past"]  # epoch 0's counts (first_epoch has begun epoch 1)
    expected = {"corrupt_image": 2, "empty_caption": 1, "boilerplate_caption": 1, "short_caption": 1}
    expected.update(aspect_ratio=1, decompression_bomb=1, bad_shards=1, samples=6)
    assert {k: counts.get(k, 0) for k in expected} == expected
    # Resumed mid-epoch, the replay does not count again what the checkpoint already holds.
    for stop in (1, 3, 5):
        head = StreamLoader(cfg, batch_size=1)
        for _, _batch in zip(range(stop), head, strict=False):
            pass
        resumed = StreamLoader(cfg, batch_size=1)
        resumed.load_state_dict(head.state_dict())
        first_epoch(resumed)
        assert resumed.state_dict()["past"] == counts, stop


def test_json_captions_and_parquet_and_image_folder_sources(tmp_path):
    import datasets

    (tmp_path / "w").mkdir()
    json_samples = [(f"{i}", {"jpg": png(fmt="JPEG"), "json": json.dumps({"caption": f"json caption {i}"}).encode()})
                    for i in range(3)]  # fmt: skip
    write_tar(tmp_path / "w" / "a.tar", json_samples)
    (tmp_path / "p").mkdir()
    rows = {"image": [{"bytes": png(), "path": None}] * 3, "caption": [f"parquet caption {i}" for i in range(3)]}
    features = datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(tmp_path / "p" / "x.parquet")
    folder = tmp_path / "f"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (0, 90, 0)).save(folder / f"{i}.png")
    (folder / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"{i}.png", "text": f"folder caption {i}"}) + "\n" for i in range(3))
    )
    for sub, kind in (("w", "json"), ("p", "parquet"), ("f", "folder")):
        cfg = DataConfig(str(tmp_path / sub), image_size=16, shuffle_buffer=1)
        got = first_epoch(StreamLoader(cfg, batch_size=1))
        assert sorted(got) == [f"{kind} caption {i}" for i in range(3)], (sub, got)


def test_modes_convert_to_rgb_as_expected():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 255, 0))
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white background
    assert to_rgb(Image.new("RGBA", (4, 4), (0, 0, 255, 255))).getpixel((0, 0)) == (0, 0, 255)
    assert to_rgb(Image.new("I;16", (4, 4), 65535)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("I;16", (4, 4), 0)).getpixel((0, 0)) == (0, 0, 0)
    r, g, b = to_rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0))).getpixel((0, 0))
    assert r > 200 and g < 50 and b < 50
    assert to_rgb(Image.new("L", (4, 4), 77)).getpixel((0, 0)) == (77, 77, 77)


def test_jpeg_draft_mode_decodes_at_reduced_size_but_not_below_need():
    buf = io.BytesIO()
    Image.new("RGB", (1024, 768), (10, 200, 10)).save(buf, "JPEG")
    img = read_image(buf.getvalue(), need=288, max_pixels=10**8)
    assert img.mode == "RGB" and min(img.size) >= 288 and img.size[0] < 1024  # DCT-scaled by 2


def test_paper_crop_is_a_near_centre_square_resized_and_cropped_without_flip():
    # Left half black, right half white: a flip would swap them.
    arr = np.zeros((300, 400, 3), np.uint8)
    arr[:, 200:] = 255
    img = Image.fromarray(arr)
    for seed in range(10):
        out = np.asarray(paper_crop(img, 64, random.Random(seed)))
        assert out.shape == (64, 64, 3)
        assert out[:, :4].mean() < 60 and out[:, -4:].mean() > 195  # dark stays left
    centre = np.asarray(paper_crop(img, 64, None))
    assert abs(int(centre[:, :31].mean()) - 0) < 5 and centre[:, 33:].mean() > 250
    a = np.asarray(paper_crop(img, 64, random.Random(7)))
    assert np.array_equal(a, np.asarray(paper_crop(img, 64, random.Random(7))))  # seeded


def test_caption_filters():
    assert caption_problem("", 2) == "empty_caption" and caption_problem(None, 2) == "empty_caption"
    assert caption_problem("DSC_0042.JPG", 2) == "boilerplate_caption"
    assert caption_problem("untitled", 2) == "boilerplate_caption"
    assert caption_problem("cat", 2) == "short_caption"
    assert caption_problem("a cat on a mat", 2) is None


def test_synthetic_shards_are_deterministic_and_checkable(tmp_path):
    a = write_webdataset(tmp_path / "a", 24, shards=3, image_size=48, seed=5)
    b = write_webdataset(tmp_path / "b", 24, shards=3, image_size=48, seed=5)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    cfg = DataConfig(str(tmp_path / "a"), image_size=48, augment=False, shuffle_buffer=1)
    batch = next(iter(StreamLoader(cfg, batch_size=24)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (24, 3, 48, 48)
    for image, caption in zip(batch["image"], batch["caption"], strict=True):
        combo = read_attributes(image.float() / 255)
        assert combo is not None and caption.startswith(f"a {combo.colour} {combo.shape}")


def test_tokenizer_script_round_trips_through_transformers(tmp_path):
    write_webdataset(tmp_path / "d", 64, shards=2, image_size=16)
    out = tmp_path / "tok" / "tokenizer.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_tokenizer.py"), "--data", str(tmp_path / "d")]
        + ["--out", str(out), "--vocab-size", "80"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(out))
    ids = tok("A Blue TRIANGLE at the bottom right")["input_ids"]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids) == "a blue triangle at the bottom right"


def test_encode_images_writes_codes_that_decode_to_the_reconstructions(tmp_path):
    import pyarrow.parquet as pq

    from dalle_ds import DiscreteVAE, get_preset, save_model

    torch.manual_seed(0)
    dvae = DiscreteVAE(get_preset("dvae-tiny")).eval()
    save_model(dvae, tmp_path / "dvae")
    rng = np.random.default_rng(0)
    arrays = {}
    for shard in range(2):
        samples = []
        for i in range(shard * 5, shard * 5 + 5):
            arrays[f"sample number {i}"] = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(arrays[f"sample number {i}"]).save(buf, "PNG")
            samples.append((f"{i:04d}", {"png": buf.getvalue(), "txt": f"sample number {i}".encode()}))
        (tmp_path / "shards").mkdir(exist_ok=True)
        write_tar(tmp_path / "shards" / f"{shard}.tar", samples)
    script = [sys.executable, str(ROOT / "scripts" / "encode_images.py"), "--dvae", str(tmp_path / "dvae")]
    script += ["--data", str(tmp_path / "shards"), "--out", str(tmp_path / "codes"), "--workers", "1"]
    script += ["--batch-size", "3", "--rows-per-file", "2"]
    for rank in range(2):  # two ranks as the launcher would start them (no process group needed)
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2"}
        proc = subprocess.run(script, capture_output=True, text=True, timeout=300, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(sorted((tmp_path / "codes").glob("codes-*.parquet"))).to_pydict()
    # rank 0 has 5 samples: batches of 3 + 2, a file whenever >= 2 rows are pending
    assert len(list((tmp_path / "codes").glob("codes-r0000-*.parquet"))) == 2
    assert sorted(table["caption"]) == sorted(arrays)  # every sample once, over both ranks
    for caption, codes in zip(table["caption"], table["codes"], strict=True):
        image = torch.from_numpy(arrays[caption]).permute(2, 0, 1).float().div(255)[None]
        with torch.no_grad():
            expected = dvae.encode(image).reshape(-1)
            stored = torch.tensor(codes)
            assert torch.equal(stored, expected)
            recon = dvae.decode(expected.reshape(1, 8, 8))
            torch.testing.assert_close(dvae.decode(stored.reshape(1, 8, 8)), recon, atol=0, rtol=0)
    # The trainers stream the codes folder: batches carry codes, no image is decoded.
    batch = next(iter(StreamLoader(DataConfig(str(tmp_path / "codes"), shuffle_buffer=1), batch_size=4)))
    assert set(batch) == {"codes", "caption"} and batch["codes"].shape == (4, 64)
