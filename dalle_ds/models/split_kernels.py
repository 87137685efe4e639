"""Attention kernels that also return the log-sum-exp, for the block path's split softmax.

The block path (:func:`dalle_ds.models.attention.block_attention`) runs an image tile's queries
against the text keys and against the tile's image window as two calls and merges them through their
log-sum-exps, so the text keys are never copied into each tile. It needs, per device, a forward that
returns ``(out, lse, aux)`` and a backward that takes the *merged* output and log-sum-exp (the
gradient of the joint softmax restricted to one key set):

* ``cpu``: PyTorch's CPU flash-attention ops (``_scaled_dot_product_flash_attention_for_cpu``), an
  additive bias allowed.
* ``cuda``: FlashAttention-2 (``_scaled_dot_product_flash_attention``) where no bias is needed (the
  text part, causal column tiles) in fp16/bf16, the memory-efficient kernel
  (``_scaled_dot_product_efficient_attention``) with a bias (row and conv tiles) and in fp32. These
  are the ops ``F.scaled_dot_product_attention`` dispatches to, called directly for their
  log-sum-exp; their outputs and gradients are checked against dense attention by
  ``scripts/gpu_check.sh`` (``attention/fp32``, ``attention/bf16``).
* ``math``: the same contract in plain tensor ops (forms each call's scores): the reference the
  tests check the merge against, and what the dry run traces on the meta device.

Every kernel takes q, k, v as (B, H, L, d) / (B, H, S, d), a boolean ``causal`` (top-left aligned,
L == S where used) and ``bias``: an additive (B, 1, L, S) tensor of q's dtype or None. ``lse`` is
fp32 (B, H, L).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["SPLIT_KERNELS", "SplitKernels", "split_kernels_for"]


@dataclass(frozen=True)
class SplitKernels:
    name: str
    forward: Callable  # (q, k, v, causal, bias) -> (out, lse, aux)
    backward: Callable  # (grad, q, k, v, out, lse, causal, bias, aux) -> (dq, dk, dv)


def _cpu_forward(q, k, v, causal, bias):
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias)
    return out, lse, None


def _cpu_backward(grad, q, k, v, out, lse, causal, bias, aux):
    backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    return backward(grad, q, k, v, out, lse, 0.0, causal, attn_mask=bias)


def _scores(q, k, causal, bias):
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if bias is not None:
        s = s + bias.float()
    if causal:
        L, S = s.shape[-2:]
        s = s.masked_fill(~torch.ones(L, S, dtype=torch.bool, device=s.device).tril(), float("-inf"))
    return s


def _math_forward(q, k, v, causal, bias):
    s = _scores(q, k, causal, bias)
    lse = s.logsumexp(-1)
    return torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.float()).to(q.dtype), lse, None


def _math_backward(grad, q, k, v, out, lse, causal, bias, aux):
    p = torch.exp(_scores(q, k, causal, bias) - lse.unsqueeze(-1))  # the joint softmax's share of this part
    g = grad.float()
    dv = torch.matmul(p.transpose(-1, -2), g)
    dp = torch.matmul(g, v.float().transpose(-1, -2))
    ds = p * (dp - (g * out.float()).sum(-1, keepdim=True)) * q.shape[-1] ** -0.5
    dq, dk = torch.matmul(ds, k.float()), torch.matmul(ds.transpose(-1, -2), q.float())
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


_cuda_ops = torch.ops.aten  # the CUDA ops' namespace (tests put an emulation of their conventions here)


def _flash_ok(q, bias) -> bool:
    return bias is None and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def _cuda_forward(q, k, v, causal, bias):
    if _flash_ok(q, bias):
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = _cuda_ops._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal
        )
        return out, lse, ("flash", cum_q, cum_k, max_q, max_k, seed, offset)
    if bias is not None:  # the kernel reads the bias per (batch, head), as SDPA expands it
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out, lse, seed, offset = _cuda_ops._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, causal)
    # The memory-efficient kernel pads the log-sum-exp's query dim (to a multiple of 32).
    return out, lse[..., : q.shape[2]], ("efficient", seed, offset, lse.shape[-1])


def _cuda_backward(grad, q, k, v, out, lse, causal, bias, aux):
    lse = lse.contiguous()
    if aux[0] == "flash":
        _, cum_q, cum_k, max_q, max_k, seed, offset = aux
        return _cuda_ops._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset
        )
    _, seed, offset, padded = aux
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    lse = F.pad(lse, (0, padded - lse.shape[-1]))
    dq, dk, dv, _ = _cuda_ops._scaled_dot_product_efficient_attention_backward(
        grad, q, k, v, bias, out, lse, seed, offset, 0.0, [True, True, True, False], causal
    )
    return dq, dk, dv


SPLIT_KERNELS = {
    "cpu": SplitKernels("cpu", _cpu_forward, _cpu_backward),
    "cuda": SplitKernels("cuda", _cuda_forward, _cuda_backward),
    "math": SplitKernels("math", _math_forward, _math_backward),
}


def _has_cpu_flash() -> bool:
    return hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward"
    )


def split_kernels_for(q: torch.Tensor) -> SplitKernels | None:
    """The split-softmax kernels for ``q``'s device, or None where there are none (the block path
    then copies the text keys into each tile and makes one SDPA call). The meta device (the dry
    run's trace) takes ``math``: it saves for backward what the device kernels' calls save."""
    device = q.device.type
    if device == "cpu":
        return SPLIT_KERNELS["cpu"] if _has_cpu_flash() else None
    if device == "cuda":  # the memory-efficient kernel reads q, k, v in 16-byte-aligned rows
        return SPLIT_KERNELS["cuda"] if (q.shape[-1] * q.element_size()) % 16 == 0 else None
    if device == "meta":
        return SPLIT_KERNELS["math"]
    return None
