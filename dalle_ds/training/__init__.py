"""DeepSpeed trainers for the dVAE and the DALL-E transformer.

``trainer`` (the shared loop), ``dvae_trainer`` / ``dalle_trainer`` (the two recipes), ``checkpointing``
(format, save, resume, export), ``metrics`` (metrics.jsonl, monitors, progress), ``optim`` (AdamW groups
and schedules), ``cli`` (command lines), ``faults`` (test-only fault injection), ``errors``.
"""

from .cli import dalle_arg_parser, dvae_arg_parser, exit_process, main_dalle, main_dvae
from .dalle_trainer import DalleTrainer
from .dvae_trainer import DVAETrainer
from .errors import TrainingStopped, UsageError

__all__ = [
    "DVAETrainer",
    "DalleTrainer",
    "TrainingStopped",
    "UsageError",
    "dalle_arg_parser",
    "dvae_arg_parser",
    "exit_process",
    "main_dalle",
    "main_dvae",
]
