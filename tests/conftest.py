import os
from pathlib import Path

import pytest
import torch

from dalle_ds.distributed.collectives import free_port  # noqa: F401  (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
# The suite runs on DeepSpeed's CPU accelerator everywhere, also on a machine with GPUs (launched
# ranks inherit this); scripts/gpu_check.sh is the GPU acceptance check.
os.environ.setdefault("DS_ACCELERATOR", "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # Small ops on a 2-core machine: extra threads only add spin-wait noise.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    # DeepSpeed JIT-builds ops into this cache: keep it inside the checkout (CI starts fresh).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def single_process_group():
    """A 1-rank gloo process group in this process, for in-process DeepSpeed engines."""
    from dalle_ds.distributed.single_process import init_single_process_group

    init_single_process_group()
    yield


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """One folder for the launcher tests' runs (runs are shared between tests of a session)."""
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="session")
def dvae_dir(workdir):
    """A random dvae-tiny folder: what the DALL-E trainer tests encode images with."""
    from dalle_ds import DiscreteVAE, get_preset, save_model

    torch.manual_seed(0)
    return save_model(DiscreteVAE(get_preset("dvae-tiny")), workdir / "dvae")


@pytest.fixture(scope="session")
def shards(workdir):
    """Four WebDataset tar shards of the captioned-shapes set (96 examples, 32 px)."""
    from dalle_ds.data.synthetic import write_webdataset

    write_webdataset(workdir / "shards", 96, shards=4, image_size=32, seed=1)
    return workdir / "shards"


@pytest.fixture
def fp16_on_cpu():
    """DeepSpeed refuses fp16 on a CPU accelerator without native fp16; the math itself runs. Allow it
    (in this process; launched ranks get it from tests/launch_env/sitecustomize.py)."""
    from dalle_ds.distributed.ds_adapter import allow_fp16_on_cpu

    with allow_fp16_on_cpu():
        yield


def run_script_main(name: str, *argv) -> int:
    """``main(argv)`` of ``scripts/<name>`` in this process (a fresh module namespace; scripts/ stays off
    sys.path, where its file names would shadow packages), torch's thread count restored after."""
    import runpy

    threads = torch.get_num_threads()
    try:
        return runpy.run_path(str(ROOT / "scripts" / name))["main"]([str(a) for a in argv])
    finally:
        torch.set_num_threads(threads)


def save_clip(root, tok_file, flip_text=False):
    """A tiny randomly initialised CLIP saved like a hub model (weights, image processor, tokenizer)
    into ``root``; ``flip_text`` negates its text projection."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 32},
        vision_config={"image_size": 32, "patch_size": 8, "hidden_size": 32, "intermediate_size": 64,
                       "num_hidden_layers": 2, "num_attention_heads": 2},
        projection_dim=16,
    )  # fmt: skip
    model = CLIPModel(config)
    if flip_text:
        with torch.no_grad():
            model.text_projection.weight.neg_()
    model.save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root)
    PreTrainedTokenizerFast(tokenizer_file=str(tok_file), pad_token="[UNK]").save_pretrained(root)
    return root



def script_result(name: str, *argv) -> tuple[int, str, str]:
    """:func:`run_script_main` as the command line would end: (exit status, stdout, stderr), a
    ``sys.exit`` / argparse exit included. For tests whose other runs cover the command's start-up."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = run_script_main(name, *argv)
            code = result if isinstance(result, int) else 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    return code, out.getvalue(), err.getvalue()
