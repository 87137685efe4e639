"""A process group of one rank in this process: what in-process DeepSpeed engines (tests, benchmarks)
and one-process runs of the communication hook need, created the way the trainer creates its group."""

from __future__ import annotations

import os

from .collectives import free_port, is_initialized
from .process_group import init_distributed

__all__ = ["init_single_process_group"]


def init_single_process_group(backend: str = "gloo") -> None:
    """Create a 1-rank ``backend`` group (rank 0 of 1 on a free loopback port) through
    :func:`~.process_group.init_distributed`, unless a process group exists already."""
    if is_initialized():
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_distributed(dist_backend=backend)
