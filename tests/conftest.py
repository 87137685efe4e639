import os
import socket
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # Small ops on a 2-core machine: extra threads only add spin-wait noise.
    torch.set_num_threads(min(2, torch.get_num_threads()))
    # DeepSpeed JIT-builds ops into this cache: keep it inside the checkout (CI starts fresh).
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def single_process_group():
    """A 1-rank gloo process group in this process, for in-process DeepSpeed engines."""
    import torch.distributed as dist

    from dalle_ds.engine import init_distributed

    if not dist.is_initialized():
        os.environ.update(
            RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
        )
        init_distributed(dist_backend="gloo")
    yield
