"""Test-only rank script: resume a trainer's run on this launch's number of ranks and save the loaded
state at once, in this layout, into another folder (tests/test_reshard.py compares the two).

``reshard_probe.py --local_rank=R dalle|dvae OUT_DIR TRAINER_ARGS...``
"""

import sys

from dalle_ds.distributed import collectives as dd
from dalle_ds.training import DalleRunConfig, DalleTrainer, DVAERunConfig, DVAETrainer, parse_run_config
from dalle_ds.training.checkpointing import Checkpointer

TRAINERS = {"dalle": (DalleTrainer, DalleRunConfig), "dvae": (DVAETrainer, DVAERunConfig)}


def main(kind: str, out: str, argv: list[str]) -> None:
    trainer_cls, config_cls = TRAINERS[kind]
    trainer = trainer_cls(parse_run_config(config_cls, argv))  # resumes (--resume in argv)
    trainer.checkpoints = Checkpointer(out, trainer.rank, keep=1)
    trainer.save()
    dd.destroy()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(args[0], args[1], args[2:])
