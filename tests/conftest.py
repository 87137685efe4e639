import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_configure(config):
    # Small ops on a 2-core machine: extra threads only add spin-wait noise.
    torch.set_num_threads(min(2, torch.get_num_threads()))
