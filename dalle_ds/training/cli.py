"""Command lines of the trainers (``scripts/train_dvae.py``, ``scripts/train_dalle.py``) and how a
trainer process ends."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from ..distributed import collectives as dd
from ..distributed import ds_adapter
from ..distributed.ds_config import DeepSpeedConfigError
from ..inference.serialization import shard_size
from ..models.config import ConfigError
from .errors import TrainingStopped, UsageError
from .grad_scaling import GradScalingConfigError

__all__ = ["base_arg_parser", "dalle_arg_parser", "dvae_arg_parser", "exit_process", "main_dalle", "main_dvae"]


def probability(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text} is not a probability in [0, 1]")
    return value


def base_arg_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", required=True, help="model preset name or YAML config")
    p.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic' (the captioned-shapes set made on the fly), or a stream: WebDataset/Parquet "
        "shards (folder or glob), an image folder with metadata.jsonl, or a hub dataset id",
    )
    p.add_argument("--image-column", default=None, help="stream: image column (default: auto)")
    p.add_argument("--caption-column", default=None, help="stream: caption column (default: auto)")
    p.add_argument("--data-workers", type=int, default=2, help="stream: data-loader workers per rank")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="stream: shuffle buffer per worker")
    p.add_argument(
        "--english-only",
        action="store_true",
        help="stream: skip captions the language detector does not find English (counted as non_english)",
    )
    p.add_argument("--data-size", type=int, default=4096, help="samples per epoch of the synthetic set")
    p.add_argument("--holdout", type=int, default=0, help="synthetic combinations held out of training")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps to train in all")
    p.add_argument("--micro-batch-size", type=int, default=None, help="per-rank micro batch (or the JSON's)")
    p.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps (or the JSON's)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="complete checkpoints to keep")
    p.add_argument("--export-shard-size", type=shard_size, default="5GB",
                   help="<output>/final: weights over this size are written as safetensors shards + index "
                        "(Hugging Face layout; 'none': one file)")  # fmt: skip
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--image-every", type=int, default=0, help="write a PNG grid every N steps (0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite losses in a row")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument(
        "--check-sync",
        action="store_true",
        help="at the end, check every rank holds identical parameters (hashes them all)",
    )
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    ds_adapter.add_config_arguments(p)
    return p


def dvae_arg_parser() -> argparse.ArgumentParser:
    p = base_arg_parser("Train the discrete VAE (image tokenizer) with DeepSpeed.")
    p.add_argument("--lr-end", type=float, default=1.25e-6)
    p.add_argument("--temperature-start", type=float, default=1.0)
    p.add_argument("--temperature-end", type=float, default=1 / 16)
    p.add_argument("--temperature-steps", type=int, default=0, help="anneal length (0: the whole run)")
    p.add_argument("--kl-weight", type=float, default=6.6)
    p.add_argument("--kl-steps", type=int, default=0, help="KL warm-up length (0: steps / 30)")
    p.add_argument("--commitment", type=float, default=0.25, help="vq quantizer: commitment loss weight")
    p.add_argument(
        "--recon-loss",
        choices=("logit_laplace", "mse"),
        default="logit_laplace",
        help="reconstruction term: the paper's logit-Laplace NLL, or MSE (small images of flat shapes)",
    )
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights (exported as final_ema)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    return p


def dalle_arg_parser() -> argparse.ArgumentParser:
    p = base_arg_parser("Train the DALL-E transformer with DeepSpeed.")
    p.add_argument("--dvae", required=False, help="trained dVAE folder (config.json + model.safetensors)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: train one on the captions)")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--bpe-dropout", type=float, default=0.1, help="BPE dropout (seeded by seed, rank and step)")
    p.add_argument("--caption-dropout", type=probability, default=0.0, help="share of null captions (for --cond-scale)")
    return p


def main_dvae(argv=None) -> int:
    from .dvae_trainer import DVAETrainer

    return _run(DVAETrainer, dvae_arg_parser().parse_args(argv))


def main_dalle(argv=None) -> int:
    from .dalle_trainer import DalleTrainer

    return _run(DalleTrainer, dalle_arg_parser().parse_args(argv))


STOPS = (UsageError, ConfigError, DeepSpeedConfigError, GradScalingConfigError, TrainingStopped)
"""Errors that end a run with a message and exit status 2 (bad arguments or configs, a stopped run)."""


def _run(cls, args) -> int:
    try:
        cls(args).run()
        code = 0
    except STOPS as err:  # raised on every rank alike
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    # Tear the process groups down before the interpreter does: gloo work left to exit-time
    # destructors can abort the process ("terminate called without an active exception"). Not on
    # an unexpected error: destroying while peers are mid-collective can hang, and the launcher
    # stops the other ranks anyway.
    dd.destroy()
    return code


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
