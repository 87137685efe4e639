"""The checks: names, phases, timeouts and the parameters their workers get."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "SAVE_EVERY",
    "SMOKE_TRAIN_RUNS",
    "THROUGHPUT_VARIANTS",
    "TRAIN_RUNS",
    "TRAIN_STEPS",
    "TRAIN_TIMEOUT",
    "Check",
    "all_checks",
]


@dataclass(frozen=True)
class Check:
    name: str
    phase: str  # "train" checks run in parallel (--jobs); the others one at a time, in order
    timeout: int  # seconds for the whole worker process
    about: str
    params: dict = field(default_factory=dict, compare=False, hash=False)


# The DALL-E trainer's throughput per attention implementation on a GPU: (attention_impl, train.compile).
# auto is block on CUDA; compiled blocks cannot trace the block path (refused), so flex compiles.
THROUGHPUT_VARIANTS = [("auto", False), ("dense", False), ("flex", False), ("flex", True)]

TRAIN_STEPS = 8
SAVE_EVERY = 4
TRAIN_TIMEOUT = 300  # the launcher run inside a train worker
# (trainer, ds_configs/<config>.json, preset, dVAE preset the DALL-E run needs): each preset size
# runs in both precisions; the small ones at ZeRO-3, where parameters are partitioned.
TRAIN_RUNS = [
    ("dvae", "zero2_fp16", "dvae-tiny", None),
    ("dvae", "zero2_bf16", "dvae-tiny", None),
    ("dvae", "zero3_fp16", "dvae-small", None),
    ("dvae", "zero3_bf16", "dvae-small", None),
    ("dalle", "zero2_fp16", "dalle-tiny", "dvae-tiny"),
    ("dalle", "zero2_bf16", "dalle-tiny", "dvae-tiny"),
    ("dalle", "zero3_fp16", "dalle-small", "dvae-small"),
    ("dalle", "zero3_bf16", "dalle-small", "dvae-small"),
]


# --cpu-smoke: one DALL-E run with the CPU config, for the launcher / metrics / export plumbing.
SMOKE_TRAIN_RUNS = [("dalle", "cpu_zero2_fp32", "dalle-tiny", "dvae-tiny")]


def all_checks(smoke: bool = False) -> list[Check]:
    checks = []
    for trainer, config, preset, dvae in SMOKE_TRAIN_RUNS if smoke else TRAIN_RUNS:
        checks.append(
            Check(
                f"train/{trainer}/{config}",
                "train",
                TRAIN_TIMEOUT + 120,
                f"scripts/train_{trainer}.py --preset {preset} with ds_configs/{config}.json under "
                f"`deepspeed --num_gpus 1`, {TRAIN_STEPS} steps; finite losses, final loads",
                {"trainer": trainer, "config": config, "preset": preset, "dvae": dvae},
            )
        )
    where = "tiny sizes on the CPU" if smoke else "text 256 + 32x32, CUDA"
    checks += [
        Check(
            "attention/fp32",
            "attention",
            120 if smoke else 300,
            f"block-sparse == dense attention, fp32, row/column/conv ({where})",
            {"dtype": "float32"},
        ),
        Check(
            "attention/bf16",
            "attention",
            120 if smoke else 300,
            f"block-sparse == dense attention, bf16 (vs bf16 and fp32 dense) ({where})",
            {"dtype": "bfloat16"},
        ),
        Check(
            "speed/attention-flex",
            "attention_speed",
            240 if smoke else 420,
            "forward + backward ms of dense, causal flash, block, flex (compiled kernel and eager) per layer kind "
            "and the 64-layer mix vs causal; values and gradients vs fp32 dense "
            f"({'tiny sizes, fp32, forward-only timings on the CPU' if smoke else 'text 256 + 32x32, bf16, CUDA'})",
        ),
        Check(
            "kvcache/fp32",
            "kvcache",
            120 if smoke else 300,
            f"generate(use_cache=True) == use_cache=False token for token, tokens/s "
            f"({'dalle-tiny, CPU' if smoke else 'dalle-small, CUDA'})",
        ),
        Check(
            "sampling/pipeline",
            "sampling",
            240 if smoke else 400,
            "a saved pipeline: cache modes and guidance agree in fp32, no per-token host sync, bf16, "
            f"accelerate blocks on GPU/CPU/disk sample the same tokens, FID on the device ({where})",
        ),
    ]
    if smoke:
        checks.append(
            Check(
                "throughput/dalle-tiny",
                "throughput",
                240,
                "the DALL-E trainer (ds_configs/cpu_zero2_fp32.json, dalle-tiny) on the CPU: tokens/s, FLOPs, "
                "the dry run's memory",
                {"preset": "dalle-tiny", "dvae": "dvae-tiny"},
            )
        )
    else:
        for impl, compiled in THROUGHPUT_VARIANTS:
            name = "throughput/dalle-1.3b" + (f"/{impl}" if impl != "auto" else "") + ("+compile" if compiled else "")
            checks.append(
                Check(
                    name,
                    "throughput",
                    480,
                    "the DALL-E trainer (ds_configs/zero2_bf16.json, dalle-1.3b, micro batch from the dry run, "
                    f"attention_impl {impl}{', train.compile' if compiled else ''}): tokens/s, MFU, peak memory vs "
                    "the dry run",
                    {"preset": "dalle-1.3b", "dvae": "dvae-paper", "attention_impl": impl, "compile": compiled},
                )
            )
    return checks
