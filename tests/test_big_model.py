"""Big-model sampling with accelerate: blocks placed on devices, the CPU and disk within a memory
budget sample the same tokens as the model loaded whole; placement arithmetic; generate.py flags."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, script_result
from PIL import Image

from dalle_ds import DALLE, DiscreteVAE, get_preset
from dalle_ds.data.synthetic import ALL_COMBOS, caption_of
from dalle_ds.data.text import train_tokenizer
from dalle_ds.inference.big_model import infer_device_map, load_pipeline_dispatched, parse_max_memory
from dalle_ds.inference.generation import add_pipeline_parts, load_pipeline, sample_images
from dalle_ds.inference.serialization import INDEX_NAME, save_model

CAPTION = "a green square at the bottom right"
BLOCK_BYTES = 4 * (128 * 384 + 384 + 128 * 128 + 128 + 2 * 128 * 512 + 512 + 128 + 4 * 128)  # dalle-tiny, fp32


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """The same dalle-tiny pipeline saved as one file and as ~200 KB shards."""
    root = tmp_path_factory.mktemp("big")
    torch.manual_seed(0)
    model, dvae = DALLE(get_preset("dalle-tiny")), DiscreteVAE(get_preset("dvae-tiny"))
    tok_file = root / "tok.json"
    train_tokenizer([caption_of(c) for c in ALL_COMBOS], 64, tok_file)
    single = add_pipeline_parts(save_model(model, root / "single"), tok_file, dvae)
    sharded = add_pipeline_parts(save_model(model, root / "sharded", max_shard_size="200KB"), tok_file, dvae)
    assert (sharded / INDEX_NAME).is_file() and not (single / INDEX_NAME).exists()
    return {"single": single, "sharded": sharded}


def reference(directory, **sampling):
    model, tokenizer = load_pipeline(directory)
    return sample_images(model, tokenizer, CAPTION, 3, batch_size=2, seed=7, top_k=16, **sampling)


def test_tiny_block_size_matches_accelerate():
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes

    with init_empty_weights():
        model = DALLE(get_preset("dalle-tiny"))
    assert compute_module_sizes(model)["blocks.0"] == BLOCK_BYTES


@pytest.mark.parametrize(
    ("layout", "device_map", "blocks_in_memory"),
    [("single", "sequential", 2), pytest.param("sharded", "sequential", 1, marks=pytest.mark.slow),
     ("sharded", "balanced", 1), ("single", "auto", 0)],  # fmt: skip
)
def test_offloaded_blocks_sample_the_same_tokens(pipelines, layout, device_map, blocks_in_memory, tmp_path):
    """A CPU budget that holds the embeddings and head plus 0-2 of the 4 blocks (and room for the
    offloaded block being run, which accelerate reserves): the rest are written to the offload folder
    and streamed back; tokens and images equal the in-memory model's. On a CPU-only budget the
    balanced maps fill like sequential."""
    images, codes = reference(pipelines[layout])
    outside = 222_208  # embeddings, final norm, heads of dalle-tiny in fp32
    budget = {"cpu": outside + int((blocks_in_memory + 1.5) * BLOCK_BYTES)}
    model, tokenizer = load_pipeline_dispatched(pipelines[layout], device_map, budget, tmp_path / "offload")
    placed = [model.hf_device_map[f"blocks.{i}"] for i in range(4)]
    assert placed == ["cpu"] * blocks_in_memory + ["disk"] * (4 - blocks_in_memory)
    assert all(model.hf_device_map[name] == "cpu" for name in ("text_emb", "image_emb", "ln_f"))
    assert len(list((tmp_path / "offload").glob("blocks.*.dat"))) == 12 * (4 - blocks_in_memory)  # 12 tensors a block
    assert model.blocks[3].mlp.fc.weight.device.type == "meta"  # not in memory: read from disk per call
    again_images, again_codes = sample_images(model, tokenizer, CAPTION, 3, batch_size=2, seed=7, top_k=16)
    assert torch.equal(again_codes, codes) and torch.equal(again_images, images)
    uncached = model.generate(
        torch.tensor([[1] * model.config.text_len]), generator=torch.Generator().manual_seed(1), use_cache=False
    )
    full = load_pipeline(pipelines[layout])[0].generate(
        torch.tensor([[1] * model.config.text_len]), generator=torch.Generator().manual_seed(1), use_cache=False
    )
    assert torch.equal(uncached, full)


def test_dispatched_bf16_matches_a_bf16_cast(pipelines, tmp_path):
    model, tokenizer = load_pipeline(pipelines["sharded"])
    model.to(torch.bfloat16).dvae.float()
    _, codes = sample_images(model, tokenizer, CAPTION, 2, seed=3, top_k=16)
    budget = {"cpu": 111_104 + 3 * BLOCK_BYTES // 2}  # bf16 halves every size: two blocks and the reserve fit
    spread, tokenizer = load_pipeline_dispatched(pipelines["sharded"], "sequential", budget, tmp_path, torch.bfloat16)
    assert list(spread.hf_device_map.values()).count("disk") == 2
    assert torch.equal(sample_images(spread, tokenizer, CAPTION, 2, seed=3, top_k=16)[1], codes)


def test_budget_errors_name_the_fix(pipelines):
    with pytest.raises(ValueError, match="offload-folder"):
        load_pipeline_dispatched(pipelines["single"], "sequential", {"cpu": 300_000})
    with pytest.raises(ValueError, match="main device 'cpu'"):
        load_pipeline_dispatched(pipelines["single"], "sequential", {"cpu": 100_000})
    with pytest.raises(ValueError, match="device_map='everywhere'"):
        load_pipeline_dispatched(pipelines["single"], "everywhere")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_pipeline_dispatched(pipelines["single"] / "missing")


def test_parse_max_memory():
    assert parse_max_memory("0=20GiB, 1=500MB,cpu=1234") == {0: 20 * 2**30, 1: 500 * 10**6, "cpu": 1234}
    assert parse_max_memory(None) is None and parse_max_memory("") is None
    for bad in ("20GiB", "gpu0=1GB", "0="):
        with pytest.raises(ValueError, match="DEVICE=SIZE"):
            parse_max_memory(bad)
    with pytest.raises(ValueError, match="'lots' is not bytes"):
        parse_max_memory("cpu=lots")


def test_placement_over_gpus_without_gpus():
    """Placement is arithmetic on sizes, so GPUs can be named without having them: balanced splits the
    blocks evenly, balanced_low_0 keeps GPU 0 light, sequential fills GPU 0 first, and the modules
    outside the blocks always go to GPU 0 (whose budget pays for them)."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = DALLE(get_preset("dalle-tiny"))
    roomy = {0: 10 * BLOCK_BYTES, 1: 10 * BLOCK_BYTES, "cpu": 10 * BLOCK_BYTES}

    def blocks(placement):
        return [placement[f"blocks.{i}"] for i in range(4)]

    assert blocks(infer_device_map(model, "sequential", roomy)) == [0, 0, 0, 0]
    balanced = infer_device_map(model, "balanced", roomy)
    assert blocks(balanced) == [0, 0, 1, 1] and balanced["text_emb"] == balanced["ln_f"] == 0
    assert blocks(infer_device_map(model, "auto", roomy)) == [0, 0, 1, 1]
    low = blocks(infer_device_map(model, "balanced_low_0", roomy))
    assert low.count(0) < low.count(1)
    # once blocks are offloaded, GPU 0 (where offloaded blocks run) keeps room for one block, as
    # does the CPU when blocks are staged from disk through it
    tight = {0: 222_208 + 2 * BLOCK_BYTES + 1000, 1: BLOCK_BYTES + 1000, "cpu": 2 * BLOCK_BYTES + 1000}
    assert blocks(infer_device_map(model, "sequential", tight)) == [0, 1, "cpu", "cpu"]
    tight["cpu"] = BLOCK_BYTES + 1000
    assert blocks(infer_device_map(model, "sequential", tight)) == [0, 1, "disk", "disk"]
    assert blocks(infer_device_map(model, {"blocks": 1, "text_emb": 0})) == [1, 1, 1, 1]


def test_generate_script_with_a_device_map_writes_the_same_grid(pipelines, tmp_path):
    """The spread run is the command in a fresh interpreter; the whole-model reference and the
    refused budgets run the same script's main in this process."""

    def argv(out, *extra):
        return [CAPTION, "--checkpoint", str(pipelines["sharded"]), "--num-candidates", "3", "--top-k-images", "3",
                "--seed", "5", "--cond-scale", "2", "--out", str(out), *extra]  # fmt: skip

    code, _, err = script_result("generate.py", *argv(tmp_path / "whole.png"))
    assert code == 0, err[-3000:]
    budget = f"cpu={222_208 + 2 * BLOCK_BYTES + 1000}"
    cmd = [sys.executable, str(ROOT / "scripts/generate.py"), *argv(tmp_path / "spread.png", "--device-map",
           "sequential", "--max-memory", budget, "--offload-folder", str(tmp_path / "off"))]  # fmt: skip
    spread = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert spread.returncode == 0, spread.stderr[-3000:]
    pixels = [np.array(Image.open(tmp_path / name)) for name in ("whole.png", "spread.png")]
    assert pixels[0].shape == pixels[1].shape and np.array_equal(*pixels)
    record = json.loads((tmp_path / "spread.png.json").read_text())
    assert record["device_map"] == "sequential" and record["cond_scale"] == 2.0  # guided, blocks on disk
    assert any((tmp_path / "off").iterdir())
    code, _, err = script_result("generate.py", *argv(tmp_path / "bad.png", "--max-memory", "cpu=1GiB"))
    assert code == 2 and "need --device-map" in err
    code, _, err = script_result("generate.py", *argv(tmp_path / "bad.png", "--device-map", "auto", "--max-memory",
                                                       "disk=lots"))  # fmt: skip
    assert code == 2 and "DEVICE=SIZE" in err


@pytest.mark.slow  # 10 s; the generate script with a device map runs by default
def test_evaluate_script_with_blocks_on_disk_reports_the_same_numbers(pipelines, tmp_path):
    """evaluate.py loads through the same options: validation loss and caption accuracy of the
    spread model (blocks on disk, guided sampling) equal the whole model's."""

    holdout = tmp_path / "holdout.json"
    holdout.write_text(json.dumps([caption_of(c) for c in ALL_COMBOS[:6]]))

    def run(name, *extra, fresh=True):  # fresh: the command in a new interpreter, else its main here
        argv = ["--checkpoint", str(pipelines["single"]), "--num", "8", "--per-caption", "2", "--holdout",
                str(holdout), "--cond-scale", "2", "--out", str(tmp_path / name), *extra]  # fmt: skip
        if fresh:
            proc = subprocess.run([sys.executable, str(ROOT / "scripts/evaluate.py"), *argv], capture_output=True,
                                  text=True, timeout=300)  # fmt: skip
            assert proc.returncode == 0, proc.stderr[-3000:]
        else:
            code, _, err = script_result("evaluate.py", *argv)
            assert code == 0, err[-3000:]
        return json.loads((tmp_path / name).read_text())

    whole = run("whole.json", fresh=False)
    spread = run("spread.json", "--device-map", "sequential", "--max-memory", f"cpu={222_208 + 2 * BLOCK_BYTES}",
                 "--offload-folder", str(tmp_path / "off"))  # fmt: skip
    assert spread["caption_accuracy"] == whole["caption_accuracy"] and spread["dvae"] == whole["dvae"]
    assert whole["caption_accuracy"]["samples"] == 12
    for key, value in whole["validation"].items():
        assert math.isclose(spread["validation"][key], value, rel_tol=1e-6), key
