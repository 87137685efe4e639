"""DeepSpeed trainers for the image tokenizers (dVAE, VQGAN) and the DALL-E transformer.

``trainer`` (the shared loop), ``dvae_trainer`` / ``vqgan_trainer`` / ``dalle_trainer`` (the recipes), ``checkpointing``
(format, save, resume, export), ``run_config`` / ``run_args`` (every training setting, from flags and
YAML), ``metrics`` (metrics.jsonl, monitors, progress), ``optim`` (AdamW groups
and schedules), ``cli`` (command lines), ``preemption`` (SIGTERM / SIGUSR1: save the step reached,
exit 75), ``faults`` (test-only fault injection), ``errors``.
"""

from .cli import dalle_arg_parser, dvae_arg_parser, exit_process, main_dalle, main_dvae, main_vqgan, vqgan_arg_parser
from .dalle_trainer import DalleTrainer
from .dvae_trainer import DVAETrainer
from .errors import TrainingStopped, UsageError
from .run_args import parse_run_config
from .run_config import DalleRunConfig, DVAERunConfig, RunConfigError, VQGANRunConfig
from .vqgan_trainer import VQGANTrainer

__all__ = [
    "DVAERunConfig",
    "DVAETrainer",
    "DalleRunConfig",
    "DalleTrainer",
    "RunConfigError",
    "TrainingStopped",
    "UsageError",
    "VQGANRunConfig",
    "VQGANTrainer",
    "dalle_arg_parser",
    "dvae_arg_parser",
    "exit_process",
    "main_dalle",
    "main_dvae",
    "main_vqgan",
    "parse_run_config",
    "vqgan_arg_parser",
]
