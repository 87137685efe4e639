"""What the throughput check divides by: the model FLOPs of one DALL-E training step (matrix
multiplies and attention, ``FLOPS_FORMULA``) and the GPUs' peak dense bf16 FLOP/s (``PEAK_BF16``).
Importable on the CPU (tests/test_gpu_check.py checks the count against torch's FLOP counter)."""

from __future__ import annotations

import re

__all__ = ["FLOPS_FORMULA", "PEAK_BF16", "model_flops", "peak_bf16", "peak_bf16_flops"]

# Peak dense bf16 tensor-core FLOP/s (no 2:4 sparsity), matched in order against
# torch.cuda.get_device_name(): (pattern, FLOP/s, where the number comes from). NVIDIA's datasheets
# print the figure with 2:4 sparsity ("with sparsity", "sparse") first; the dense one is half of it.
PEAK_BF16: list[tuple[str, float, str]] = [
    (r"GH200", 989e12, "NVIDIA GH200 Grace Hopper Superchip datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    (r"H200 NVL", 835e12, "NVIDIA H200 Tensor Core GPU datasheet, H200 NVL: BF16 Tensor Core 1,671 TFLOPS, sparse"),
    (r"H200", 989e12, "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    (r"H100 NVL", 835e12, "NVIDIA H100 Tensor Core GPU datasheet, H100 NVL (per GPU): BF16 1,671 TFLOPS with sparsity"),
    (r"H100 PCIe", 756e12, "NVIDIA H100 PCIe product brief PB-11133-001 v02 (Nov 2022): BF16 1,513 TFLOPS, sparse"),
    # SXM names read e.g. "NVIDIA H100 80GB HBM3".
    (r"H100", 989e12, "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    (r"H800", 989e12, "NVIDIA H800 Tensor Core GPU datasheet, H800 SXM: BF16 Tensor Core 1,979 TFLOPS with sparsity"),
    (r"GB200", 2500e12, "NVIDIA GB200 NVL72 datasheet: FP16/BF16 Tensor Core 360 PFLOPS with sparsity for 72 GPUs"),
    (r"B200", 2250e12, "NVIDIA HGX B200 datasheet: FP16/BF16 Tensor Core 36 PFLOPS with sparsity for 8 GPUs"),
    (r"A100|A800", 312e12, "NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS, 624 with sparsity"),
    (r"L40S", 362e12, "NVIDIA L40S GPU datasheet: BF16 Tensor Core 362.05 TFLOPS, 733 with sparsity"),
    (r"L40\b", 181e12, "NVIDIA L40 GPU datasheet: BF16 Tensor Core 181.05 TFLOPS, 362.1 with sparsity"),
    (r"\bL4\b", 121e12, "NVIDIA L4 Tensor Core GPU datasheet: BF16 Tensor Core 121 TFLOPS, 242 with sparsity"),
    (r"\bA10\b", 125e12, "NVIDIA A10 Tensor Core GPU datasheet: BF16 Tensor Core 125 TFLOPS, 250 with sparsity"),
]


def peak_bf16(device_name: str) -> tuple[float | None, str | None]:
    """(peak FLOP/s, its source) of the first ``PEAK_BF16`` entry whose pattern ``device_name``
    matches; (None, None) for an unknown device."""
    for pattern, peak, source in PEAK_BF16:
        if re.search(pattern, device_name):
            return peak, source
    return None, None


def peak_bf16_flops(device_name: str) -> float | None:
    return peak_bf16(device_name)[0]


FLOPS_FORMULA = (
    "model FLOPs per step = matmul + attention; matmul = 6 * B * (n * W_blocks + (T - 1) * W_text_head + "
    "N * W_image_head), W = the weight matrices' elements (attention qkv and proj, MLP fc and proj; the output "
    "heads, tied to the embeddings and counted once; embedding lookups, biases and norms are not matmuls); "
    "attention = 12 * d_model * B * sum over layers of the allowed (query, key) pairs of that layer's mask; "
    "n = T + N (T = text_len, N = image_grid**2), B = sequences per step; 2 FLOPs per multiply-add, "
    "backward = 2 x forward; recomputation under activation checkpointing and the masked-out scores the "
    "kernels compute anyway are not counted"
)


def model_flops(config, batch: int) -> dict:
    """FLOPs of one training step (forward + backward) of ``batch`` full sequences (FLOPS_FORMULA):
    ``matmul``, ``attention``, ``total``, the parameter counts they come from and the allowed pairs
    per layer kind."""
    import torch

    from dalle_ds import DALLE, attention_mask, layer_schedule

    c = config
    with torch.device("meta"):
        model = DALLE(c)
    params = sum(p.numel() for p in model.parameters())
    block_weights = sum(m.weight.numel() for m in model.blocks.modules() if isinstance(m, torch.nn.Linear))
    text_head, image_head = c.d_model * c.text_vocab_with_pad, c.d_model * c.image_vocab_size
    # The text head reads the T - 1 positions that predict text, the image head the N that predict
    # codes; the last position predicts nothing.
    per_sequence = c.seq_len * block_weights + (c.text_len - 1) * text_head + c.image_len * image_head
    pairs = {
        kind: int(attention_mask(kind, c.text_len, c.image_grid, c.conv_kernel).sum())
        for kind in set(layer_schedule(c.n_layers))
    }
    attn_pairs = sum(pairs[kind] for kind in layer_schedule(c.n_layers))
    matmul = 6 * batch * per_sequence
    attention = 12 * c.d_model * batch * attn_pairs
    return {
        "params": params,
        "matmul_params": block_weights + text_head + image_head,
        "matmul": matmul,
        "attention": attention,
        "total": matmul + attention,
        "pairs": pairs,
    }
