"""Command lines of the trainers (``scripts/train_dvae.py``, ``train_vqgan.py``, ``train_dalle.py``) and how a
trainer process ends: 0 when done, 2 on a usage error or a stopped run (one message, see
:func:`_report_stop`), 75 when preempted."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from ..distributed import collectives as dd
from ..distributed.ds_config import DeepSpeedConfigError
from ..models.config import ConfigError
from .checkpointing import CheckpointError
from .errors import TrainingStopped, UsageError
from .grad_scaling import GradScalingConfigError
from .preemption import PREEMPTED_EXIT_CODE, Preempted, install_signal_handlers
from .run_args import arg_parser, parse_run_config
from .run_config import DalleRunConfig, DVAERunConfig, VQGANRunConfig

__all__ = [
    "dalle_arg_parser",
    "dvae_arg_parser",
    "exit_process",
    "main_dalle",
    "main_dvae",
    "main_vqgan",
    "vqgan_arg_parser",
]


def dvae_arg_parser() -> argparse.ArgumentParser:
    """``scripts/train_dvae.py``'s flags: one per :class:`DVAERunConfig` setting, plus ``--config``."""
    return arg_parser(DVAERunConfig, DVAE_DESCRIPTION)


def dalle_arg_parser() -> argparse.ArgumentParser:
    """``scripts/train_dalle.py``'s flags: one per :class:`DalleRunConfig` setting, plus ``--config``."""
    return arg_parser(DalleRunConfig, DALLE_DESCRIPTION)


def vqgan_arg_parser() -> argparse.ArgumentParser:
    """``scripts/train_vqgan.py``'s flags: one per :class:`VQGANRunConfig` setting, plus ``--config``."""
    return arg_parser(VQGANRunConfig, VQGAN_DESCRIPTION)


DVAE_DESCRIPTION = "Train the discrete VAE (image tokenizer) with DeepSpeed."
VQGAN_DESCRIPTION = "Train or fine-tune a VQGAN image tokenizer (L1, LPIPS, codebook, patch GAN) with DeepSpeed."
DALLE_DESCRIPTION = "Train the DALL-E transformer with DeepSpeed."


def main_dvae(argv=None) -> int:
    from .dvae_trainer import DVAETrainer

    return _run(DVAETrainer, DVAERunConfig, DVAE_DESCRIPTION, argv)


def main_vqgan(argv=None) -> int:
    from .vqgan_trainer import VQGANTrainer

    return _run(VQGANTrainer, VQGANRunConfig, VQGAN_DESCRIPTION, argv)


def main_dalle(argv=None) -> int:
    from .dalle_trainer import DalleTrainer

    return _run(DalleTrainer, DalleRunConfig, DALLE_DESCRIPTION, argv)


STOPS = (UsageError, ConfigError, DeepSpeedConfigError, GradScalingConfigError, TrainingStopped, CheckpointError)
"""Errors that end a run with a message and exit status 2 (bad arguments or configs, a stopped run)."""


def _run(trainer, config_cls, description: str, argv) -> int:
    install_signal_handlers()  # before anything forks: data workers inherit them
    training = False
    try:
        cfg = parse_run_config(config_cls, argv, description)
        run = trainer(cfg)
        training = True
        run.run()
        code = 0
    except Preempted as stop:  # every rank saved its part of the checkpoint
        if dd.rank() == 0:
            print(f"[dalle-ds] {stop}", flush=True)
        code = PREEMPTED_EXIT_CODE
    except STOPS as err:
        _report_stop(err, alike=not training or isinstance(err, TrainingStopped))
        code = 2
    # Tear the process groups down before the interpreter does: gloo work left to exit-time
    # destructors can abort the process ("terminate called without an active exception"). Not on
    # an unexpected error: destroying while peers are mid-collective can hang, and the launcher
    # stops the other ranks anyway.
    dd.destroy()
    return code


def _report_stop(err: Exception, alike: bool) -> None:
    """Print a STOPS error once: rank 0 prints it, another rank only when rank 0 is not known to raise
    the same (``alike`` false), with its rank named, so that an error only some ranks raise is never lost.

    Errors of the set-up are alike: every rank parses the same flags, reads the same configs and files
    and checks the checkpoint ``--resume`` chose together. So is the non-finite stop (every rank saves
    before it). Another error raised while training may come from one rank's own data."""
    rank = dd.rank() if dd.is_initialized() else int(os.environ.get("RANK", "0"))  # the launcher's, before init
    if rank == 0 or not alike:
        print(f"error{f' (rank {rank})' if rank else ''}: {err}", file=sys.stderr, flush=True)


def exit_process(code: int) -> NoReturn:
    """End a trainer process: Python's exit handlers run (monitors such as wandb finish, logging
    flushes), then the process leaves without interpreter finalisation. Process groups are already
    destroyed by then, but C++ objects DeepSpeed and torch still hold (gloo contexts, work threads)
    are torn down at finalisation in no particular order, and a finished rank sometimes aborts there
    ("terminate called without an active exception", exit code 250): a scheduler would count a
    completed run as failed."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)
