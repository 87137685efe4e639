#!/usr/bin/env python3
"""Per-GPU memory of model states (params, gradients, optimizer) for each ZeRO stage and offload choice.

    python scripts/estimate_memory.py --preset dalle-12b --nodes 16 --gpus-per-node 8

Counts parameters on the meta device (nothing is allocated) and applies DeepSpeed's own estimators
(mixed precision with fp32 Adam states). Activations come on top and depend on batch size and
activation checkpointing.
"""

import argparse
import sys

from dalle_ds import DALLE, DalleConfig, DiscreteVAE, load_config
from dalle_ds.models.init import meta_modules


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", required=True, help="preset name or YAML config")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpus-per-node", type=int, default=8)
    parser.add_argument("--buffer-factor", type=float, default=1.5, help="DeepSpeed's additional_buffer_factor")
    args = parser.parse_args(argv)

    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    config = load_config(args.preset)
    with meta_modules():
        model = DALLE(config) if isinstance(config, DalleConfig) else DiscreteVAE(config)
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    gpus, g = args.nodes * args.gpus_per_node, args.gpus_per_node
    P, L, gib = total, largest, 2**30
    print(
        f"{args.preset}: {P / 1e9:.3f}e9 parameters, largest layer {L / 1e6:.1f}e6; "
        f"{args.nodes} node(s) x {g} GPU(s) = {gpus}"
    )
    # Mixed precision with Adam (ZeRO paper): 2 B fp16 params + 2 B fp16 grads + 12 B fp32 master,
    # momentum and variance per parameter; ZeRO-1/2/3 shard the last 12, 14 and all 16 bytes.
    cpu2, gpu2 = estimate_zero2_model_states_mem_needs(P, g, args.nodes, False, args.buffer_factor)
    cpu2o, gpu2o = estimate_zero2_model_states_mem_needs(P, g, args.nodes, True, args.buffer_factor)
    cpu3, gpu3, _ = estimate_zero3_model_states_mem_needs(P, L, g, args.nodes, False, False, True, args.buffer_factor)
    cpu3o, gpu3o, _ = estimate_zero3_model_states_mem_needs(P, L, g, args.nodes, True, False, True, args.buffer_factor)
    cpu3p, gpu3p, _ = estimate_zero3_model_states_mem_needs(P, L, g, args.nodes, True, True, True, args.buffer_factor)
    rows = [  # (setting, GPU bytes, CPU bytes per node, DeepSpeed's GPU estimate or None)
        ("ZeRO-0 (data parallel)", 16 * P, 0, None),
        ("ZeRO-1", 4 * P + 12 * P / gpus, 0, None),
        ("ZeRO-2", 2 * P + 14 * P / gpus, 0, gpu2),
        ("ZeRO-2 + optimizer offload", 2 * P + 2 * P / gpus, 16 * P / gpus * g, gpu2o),
        ("ZeRO-3", 16 * P / gpus + 4 * L, 0, gpu3),
        ("ZeRO-3 + optimizer offload", 4 * P / gpus + 4 * L, 16 * P / gpus * g, gpu3o),
        ("ZeRO-3 + optimizer + param offload", 4 * L, 18 * P / gpus * g, gpu3p),
    ]
    print(f"{'setting':<36} {'GPU GiB':>9} {'CPU GiB/node':>13} {'DeepSpeed GPU est.':>19}")
    for label, gpu, cpu, ds in rows:
        ds_text = "-" if ds is None else f"{ds / gib:.2f}"
        print(f"{label:<36} {gpu / gib:9.2f} {cpu / gib:13.2f} {ds_text:>19}")
    print("model states only; add activations (batch, sequence, activation checkpointing) and buffers")
    return 0


if __name__ == "__main__":
    sys.exit(main())
