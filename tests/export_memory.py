"""Helper process of tests/test_export.py: make DeepSpeed checkpoints, or export one and report memory.

    python export_memory.py make <root> <stage> [<stage> ...]   # <root>/zero<stage>/<tag>, 1 rank, gloo
    python export_memory.py measure <checkpoint dir> <out> <max shard size | none | deepspeed>

``measure`` imports everything and runs the export once to warm up, resets the kernel's peak-RSS mark
(``/proc/self/clear_refs``), runs it again, and prints one JSON line: the peak resident memory above
the resident memory at the start (``growth``, bytes; file pages mapped from the checkpoint count),
the largest tensor and the model's size. ``deepspeed`` runs DeepSpeed's in-memory ``zero_to_fp32``
instead, as the baseline.
"""

import gc
import json
import os
import sys
from pathlib import Path

import torch

TAG = "step00000001"


def make(root: Path, stages: list[int]) -> None:
    import deepspeed

    from dalle_ds import DALLE, get_preset
    from dalle_ds.distributed import ds_adapter

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
    ds_adapter.init_process_group("gloo")  # without the 60 s JIT build of DeepSpeed's shm op
    config = get_preset("dalle-small")
    for stage in stages:
        torch.manual_seed(stage)
        model = DALLE(config)
        ds_config = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": stage},
            "zero_force_ds_cpu_optimizer": False,
        }
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        text = torch.randint(0, config.text_vocab_size, (1, config.text_len))
        codes = torch.randint(0, config.image_vocab_size, (1, config.image_len))
        engine.backward(engine(text, codes).loss)
        engine.step()  # Adam moments exist: the optimizer files hold 3x the weights, as in a real run
        engine.save_checkpoint(str(root / f"zero{stage}"), tag=TAG, client_state={"model_config": config.to_dict()})


def status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def measure(ckpt: Path, out: Path, shard: str) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dalle_ds.inference.serialization import shard_size
    from dalle_ds.training.checkpointing import export_checkpoint

    sizes = [t.numel() * 4 for t in _meta_model().state_dict().values()]

    def run(target: Path) -> None:
        if shard == "deepspeed":
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG)
            del state
        else:
            export_checkpoint(ckpt, target, TAG, shard_size(shard))
        gc.collect()

    run(out.with_name(out.name + "_warmup"))  # first-use imports and allocator growth are not the export's
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    start = status_kb("VmRSS")
    run(out)
    growth = (status_kb("VmHWM") - start) * 1024
    print(json.dumps({"growth": growth, "largest_tensor": max(sizes), "model_bytes": sum(sizes)}))


def _meta_model():
    from dalle_ds import DALLE, get_preset

    with torch.device("meta"):
        return DALLE(get_preset("dalle-small"))


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]), [int(s) for s in sys.argv[3:]])
    else:
        measure(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
