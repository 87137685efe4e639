"""DeepSpeed trainers for the dVAE and the DALL-E transformer."""

from .trainer import DalleTrainer, DVAETrainer, dalle_arg_parser, dvae_arg_parser, exit_process, main_dalle, main_dvae

__all__ = [
    "DVAETrainer",
    "DalleTrainer",
    "dalle_arg_parser",
    "dvae_arg_parser",
    "exit_process",
    "main_dalle",
    "main_dvae",
]
