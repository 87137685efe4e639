"""What a model is made of and what its forward saves for backward, found on the meta device.

:func:`model_shape` builds the DALL-E on the meta device (no weights allocated) and lists its
parameters (names, shapes, the modules that own them). :func:`trace_activations` runs the real
forward and loss on meta inputs under :func:`torch.autograd.graph.saved_tensors_hooks` and records
every tensor autograd keeps for backward, attributed to the embeddings, each transformer block or
the logits and loss: the same tensors a real run saves, without a byte of memory. Parameters that
ops save are not counted (they are weights, counted once elsewhere).

On the meta device ``scaled_dot_product_attention`` takes its math path, which saves the whole
fp32 attention matrix; the fused kernels a real run takes (flash on CPU, memory-efficient or cuDNN
on GPU with a mask) save the inputs, the output, the mask as a bias and one fp32 log-sum-exp per
query. The trace stands in an op that saves exactly that (tests compare with a real forward).
The block path runs its split-softmax Function with the plain-ops kernels there
(:mod:`dalle_ds.models.split_kernels`): it saves what it saves with the CPU and CUDA kernels.
FlexAttention (``attention_impl: flex``) cannot run on the meta device; the trace stands in the same
op for its kernel, without a bias (its block mask is a few small index tensors, shared by layers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from ..models import flex
from ..models.attention import resolve_attention_impl
from ..models.config import DalleConfig, DVAEConfig, VQGANConfig
from ..models.dalle import DALLE
from ..models.init import meta_modules
from ..models.tokenizer import build_model
from ..training.optim import param_groups

__all__ = ["ActivationTrace", "ModelShape", "ParamInfo", "dvae_param_count", "model_shape", "trace_activations"]


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    name: str
    shape: tuple[int, ...]
    module: str  # the owning module's qualified name

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    config: DalleConfig
    params: tuple[ParamInfo, ...]  # in ``named_parameters`` order (the order DeepSpeed buckets them in)
    group_numels: tuple[int, ...]  # elements of each optimizer parameter group (the trainer's AdamW groups)

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.params)

    @property
    def largest_module_numel(self) -> int:
        """Parameters of the largest single module (what ZeRO-3 gathers at once, what a module-by-module
        materialisation holds on the host)."""
        per: dict[str, int] = {}
        for p in self.params:
            per[p.module] = per.get(p.module, 0) + p.numel
        return max(per.values())

    def embedding_numel(self) -> int:
        return sum(p.numel for p in self.params if p.module.endswith(("_emb", "_pos", "_row", "_col")))


@functools.lru_cache(maxsize=32)
def model_shape(config: DalleConfig) -> ModelShape:
    with meta_modules():
        model = DALLE(config)
    owners = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            owners[f"{mod_name}.{p_name}" if mod_name else p_name] = mod_name
    params = tuple(ParamInfo(n, tuple(p.shape), owners[n]) for n, p in model.named_parameters())
    groups = tuple(sum(p.numel() for p in g["params"]) for g in param_groups(model, 0.0))
    return ModelShape(config, params, groups)


@functools.lru_cache(maxsize=8)
def dvae_param_count(config: DVAEConfig | VQGANConfig) -> int:
    """Parameters of the frozen image tokenizer (a dVAE or a VQGAN)."""
    with meta_modules():
        return sum(p.numel() for p in build_model(config).parameters())


@dataclasses.dataclass(frozen=True)
class ActivationTrace:
    """Bytes autograd saves in one micro batch's forward (no activation checkpointing)."""

    micro_batch: int
    dtype: torch.dtype
    embeddings: int  # saved by the embedding sums, before the first block
    blocks: tuple[int, ...]  # saved inside each transformer block
    block_inputs: tuple[int, ...]  # each block's input (what activation checkpointing keeps)
    head: int  # final norm, logits and cross-entropy
    logits: int  # the fp32 logits tensors themselves (their gradient is as large, at backward's start)
    attention_impl: str

    @property
    def total(self) -> int:
        return self.embeddings + sum(self.blocks) + self.head

    def checkpointed_blocks(self, inputs_on_host: bool = False) -> int:
        """Peak bytes the embeddings and blocks hold with every block checkpointed: the embeddings'
        tensors, each block's input (kept by its checkpoint, unless on the host) and, while backward
        recomputes a block, that block's whole set (its own input among them)."""
        kept = 0 if inputs_on_host else sum(self.block_inputs)
        own = (0,) * len(self.blocks) if inputs_on_host else self.block_inputs
        return self.embeddings + max((kept - i + b for b, i in zip(self.blocks, own, strict=True)), default=kept)

    def checkpointed_peak(self, inputs_on_host: bool = False) -> int:
        """Peak saved bytes with every block checkpointed: the end of forward (block inputs and the
        head's tensors) or a block's recomputation (the head's tensors are freed by then)."""
        kept = 0 if inputs_on_host else sum(self.block_inputs)
        return max(self.embeddings + kept + self.head, self.checkpointed_blocks(inputs_on_host))


@contextlib.contextmanager
def _fused_attention() -> Iterator[None]:
    """Attention as fused kernels save it, and torch's own ``F.linear``: DeepSpeed's first
    ``zero.Init`` in a process replaces it for good, and the trace must not depend on whether one ran."""
    original, linear, flex_kernel = F.scaled_dot_product_attention, F.linear, flex._kernel
    F.scaled_dot_product_attention, F.linear, flex._kernel = _fused_sdpa, torch._C._nn.linear, _fused_flex
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.linear, flex._kernel = original, linear, flex_kernel


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel saves for backward (on meta tensors: shapes only)."""

    @staticmethod
    def forward(ctx, q, k, v, bias):
        B, H, n = q.shape[:-1]  # the kernels write the output in (B, n, H, d) memory order
        out = q.new_empty((B, n, H, v.shape[-1])).transpose(1, 2)
        logsumexp = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, logsumexp, *([] if bias is None else [bias]))
        return out

    @staticmethod
    def backward(ctx, grad):  # never runs: the trace has no backward
        raise NotImplementedError


def _fused_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    bias = None if attn_mask is None else attn_mask.new_empty(attn_mask.shape, dtype=q.dtype)
    return _FusedAttention.apply(q, k, v, bias)


def _fused_flex(q, k, v, block_mask, compile):
    return _FusedAttention.apply(q, k, v, None)


@functools.lru_cache(maxsize=64)
def trace_activations(config: DalleConfig, micro_batch: int, dtype: torch.dtype, device_type: str) -> ActivationTrace:
    """Run the forward and loss of one micro batch on the meta device in ``dtype`` with each layer's
    attention implementation as it resolves on ``device_type`` (e.g. 'cuda'), recording what autograd
    saves. Storages are counted once (views of one tensor share it)."""
    with meta_modules():
        model = DALLE(config)
    model.to(dtype)
    seq = config.text_len + config.image_len
    impls = set()
    for block in model.blocks:
        block.attn.impl = resolve_attention_impl(config.attention_impl, device_type, seq)
        impls.add(block.attn.impl)
    param_storages = {p.untyped_storage()._cdata for p in model.parameters()}
    phase = ["embeddings"]
    saved: dict[str, dict[int, int]] = {}
    inputs: list[int] = []

    held: list[torch.Tensor] = []  # keeps every saved storage alive: no address is reused under a key

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage._cdata not in param_storages:
            saved.setdefault(phase[0], {})[storage._cdata] = storage.nbytes()
            held.append(t)
        return t

    def enter(name):
        def hook(module, args):
            phase[0] = name
            if name.startswith("block"):
                inputs.append(args[0].numel() * args[0].element_size())

        return hook

    handles = [block.register_forward_pre_hook(enter(f"block{i}")) for i, block in enumerate(model.blocks)]
    handles.append(model.ln_f.register_forward_pre_hook(enter("head")))
    text = torch.zeros(micro_batch, config.text_len, dtype=torch.long, device="meta")
    codes = torch.zeros(micro_batch, config.image_len, dtype=torch.long, device="meta")
    try:
        with _fused_attention(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(text, image_codes=codes, return_logits=True, check_inputs=False)  # no values to check
    finally:
        for h in handles:
            h.remove()
    # A storage saved in two phases (a block's output is the next block's input) counts where it was
    # first saved.
    seen: set[int] = set()
    totals: dict[str, int] = {}
    for name in ["embeddings", *(f"block{i}" for i in range(len(model.blocks))), "head"]:
        part = {k: v for k, v in saved.get(name, {}).items() if k not in seen}
        seen.update(part)
        totals[name] = sum(part.values())
    logits = sum(t.numel() * t.element_size() for t in (out.text_logits, out.image_logits))
    return ActivationTrace(
        micro_batch=micro_batch,
        dtype=dtype,
        embeddings=totals["embeddings"],
        blocks=tuple(totals[f"block{i}"] for i in range(len(model.blocks))),
        block_inputs=tuple(inputs),
        head=totals["head"],
        logits=logits,
        attention_impl="+".join(sorted(impls)),
    )
