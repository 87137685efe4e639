"""The data benchmark (dalle_ds/bench/data.py, scripts/bench_data.py) at a toy size: every case
decodes every JPEG (the pipelines all but their first batch, before their clock starts) and the
pipelines report when their first batch came."""

import io

from PIL import Image

from dalle_ds.bench.data import WORDS, make_captions, make_jpegs, measure


def test_inputs_are_reproducible_jpegs_and_captions():
    jpegs = make_jpegs(3, (64, 48))
    assert jpegs == make_jpegs(3, (64, 48)) and len(set(jpegs)) == 3
    assert Image.open(io.BytesIO(jpegs[0])).size == (64, 48)
    captions = make_captions(3)
    assert captions == make_captions(3) and all(len(c.split()) == 6 and set(c.split()) <= set(WORDS) for c in captions)


def test_every_case_reads_every_image():
    jpegs, captions = make_jpegs(24, (64, 48)), make_captions(24)
    result = measure(jpegs, captions, image_size=32, batch_size=4, shards=2, max_workers=1, rounds=1)
    cases = ["raw decode", "decode+crop", "pipeline", "pipeline x1 workers"]
    assert list(result["rates"]) == cases and all(len(v) == 1 and v[0] > 0 for v in result["rates"].values())
    assert result["images"] == {"raw decode": [24], "decode+crop": [24], "pipeline": [20], "pipeline x1 workers": [20]}
    assert set(result["startup"]) == {"pipeline", "pipeline x1 workers"}
