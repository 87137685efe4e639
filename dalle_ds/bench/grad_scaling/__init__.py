"""fp16 gradient fidelity of a deep, narrow DALL-E: one dynamic loss scale (DeepSpeed fp16) vs
per-resblock scales (``dalle_ds.training.grad_scaling``), against fp32 (``scripts/bench_grad_scaling.py``).

- ``runs``: the settings, the three training runs through in-process DeepSpeed engines, summary rows;
- ``fidelity``: per res block, a run's gradients against an fp32 reference;
- ``scan``: one backward per static scale, and the scales each block can use;
- ``tables``: the results as Markdown tables.
"""

from .runs import FP16_METHODS, METHODS, QUICK, GradScalingSettings, bench, sweep

__all__ = ["FP16_METHODS", "METHODS", "QUICK", "GradScalingSettings", "bench", "sweep"]
