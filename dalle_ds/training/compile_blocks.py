"""What wraps the transformer's blocks before the engine: ``torch.compile`` (``train.compile``), then
DeepSpeed's activation checkpointing (the JSON's ``activation_checkpointing``).

Each block's forward is compiled on its own, from outside the model (as torchtitan compiles its
blocks): the module tree, parameter names and checkpoints stay the eager model's, and blocks of one
attention kind share a graph, so a model compiles one graph per kind (row, column, conv) and grad
mode, whatever its depth. Only the training call ``block(x)`` runs compiled, from its second call
on; a call with a KV cache (sampling) runs the eager forward. ``fullgraph=True``: a block that
would break into pieces raises torch's error when it compiles instead of running them.

The order, compile inside and checkpointing around it: dynamo does not trace into
``deepspeed.checkpointing.checkpoint`` (a skipped function), so a compiled checkpointed block would
run eagerly. Compiled first, the checkpointed forward runs one graph under no_grad and the
recompute in backward another with grad.

Attention must trace: ``dense`` does, ``block`` does not (its tile plans and masks are cached in
Python dicts keyed by ``id(plan)``, which dynamo fails on), so blocks whose attention runs as
``block`` (``auto``'s choice on GPUs and on the CPU above 128 positions) are refused by name.

ZeRO-3 gathers and releases parameters in ``torch.compiler.disable``d hooks on every submodule,
which would break a compiled block at each of its layers (12 graphs for one block, measured).
Each block is made a ZeRO-3 leaf module instead: its parameters are gathered at once by hooks on
the block, outside the compiled forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..distributed import ds_adapter
from ..distributed.ds_config import zero_stage
from ..models.attention import resolve_attention_impl
from .errors import UsageError

__all__ = ["compile_blocks", "wrap_blocks"]


def compile_blocks(blocks: torch.nn.ModuleList, zero3: bool = False, device_type: str = "cpu") -> None:
    """Replace each block's forward by its ``torch.compile``d version for the training call; under
    ``zero3`` make each block a ZeRO-3 leaf module (before the engine is built). ``device_type``: where
    the blocks will run (what ``auto`` attention resolves for)."""
    for i, block in enumerate(blocks):
        attn = block.attn
        impl = resolve_attention_impl(attn.impl, device_type, attn.text_len + attn.grid_size**2, needs_grad=False)
        if impl == "block":
            raise UsageError(
                f"train.compile (--compile): blocks[{i}] run attention_impl={attn.impl!r} as 'block' on "
                f"{device_type}, which torch.compile cannot trace (tile plans cached by id); set the model "
                f"config's attention_impl to 'dense', or train without --compile"
            )
        if getattr(block.forward, "_grad_scaling_wrapper", False):
            raise UsageError(
                "train.compile (--compile) and the DeepSpeed JSON's per_resblock_grad_scaling do not combine: "
                "the scaling's hooks and autograd functions would break each compiled block into pieces; "
                "turn one of them off"
            )
        if zero3:
            ds_adapter.zero3_leaf(block)
        block.forward = _compiled_forward(block.forward)


def _compiled_forward(eager: Callable) -> Callable:
    """``eager`` compiled for the training call ``forward(x)``, whose first call runs eagerly: it fills
    the model's Python-level caches (attention masks), which a trace would otherwise see empty and
    recompile once filled (dynamo's recompile limit of 8 was hit at 3 attention kinds x 2 grad modes)."""
    compiled = torch.compile(eager, fullgraph=True)
    warm = False

    def forward(x, *args, **kwargs):
        nonlocal warm
        if args or kwargs:  # a KV cache (sampling): its shapes change at every token
            return eager(x, *args, **kwargs)
        if not warm:
            warm = True
            return eager(x)
        return compiled(x)

    return forward


def wrap_blocks(
    blocks: torch.nn.ModuleList, ds_config: dict[str, Any], compile: bool, log: Callable[[str], None]
) -> bool:
    """Compile the blocks when ``compile``, then apply the JSON's activation checkpointing around
    them; returns whether checkpointing was applied."""
    if compile:
        zero3 = zero_stage(ds_config) == 3
        compile_blocks(blocks, zero3, ds_adapter.accelerator()[0])
        leaves = ", each a ZeRO-3 leaf module" if zero3 else ""
        log(f"train.compile: {len(blocks)} transformer blocks compile on their second call (torch.compile{leaves})")
    return ds_adapter.apply_activation_checkpointing(blocks, ds_config)
