"""Helper of tests/test_construction.py, run as every rank of a job (tests/launching.py spawn_ranks):
build the DALL-E trainer from the command line, check that all ranks hold the same parameters, and
let rank 0 save them, gathered under ZeRO-3 and as fp32, to ``<output-dir>/initial_weights.pt``
before any step is taken."""

import sys

from dalle_ds.distributed import ds_adapter
from dalle_ds.training import DalleRunConfig, DalleTrainer, parse_run_config

if __name__ == "__main__":
    import torch

    trainer = DalleTrainer(parse_run_config(DalleRunConfig, sys.argv[1:]))
    trainer.check_sync()
    params = dict(trainer.engine.module.named_parameters())
    with ds_adapter.gathered(list(params.values()), enabled=trainer.zero3):
        state = {name: p.detach().float().cpu().clone() for name, p in params.items()}
    if trainer.rank == 0:
        torch.save(state, trainer.out / "initial_weights.pt")
