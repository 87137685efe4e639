"""Per-resblock gradient scaling for fp16 training (DALL-E paper, Appendix D).

One global loss scale cannot serve a deep pre-norm transformer in fp16: the gradients of the
later res blocks are orders of magnitude larger than those of the earlier ones, so any single
scale either overflows late blocks or underflows early ones. Instead every res block (each
transformer layer has two: the attention branch and the MLP branch) gets its own scale ``s_k``:

- the gradient enters the fp16 branch multiplied by ``s_k`` (a boundary at the branch's output)
  and leaves it divided by ``s_k`` (a boundary at the branch's input), where Inf/NaN entries are
  zeroed and the branch is flagged; the identity (residual) path and the stream between branches
  carry unscaled fp32 gradients;
- the branch's parameter gradients are divided by ``s_k`` in fp32 (a tensor hook per parameter,
  which runs before the gradient is accumulated into ``.grad`` and before DeepSpeed's reduction
  hooks), non-finite entries zeroed and the branch flagged. DeepSpeed, PowerSGD and gradient
  clipping only ever see unscaled, finite gradients;
- ``s_k`` starts at ``M * 2**13`` (M: data-parallel ranks with ``scale_with_ranks``, else 1: see
  :class:`ResblockScalingConfig`), grows by ``2**(1/1000)`` after every
  clean update and is divided by ``sqrt(2)`` when branch k produced a non-finite gradient, at most
  once per 125 updates per branch; the update is skipped whenever any gradient was non-finite.
  Scales are clamped to ``[M * 2**7, M * 2**24]``.

Precision scheme (AMP-style). Module parameters stay fp32. The scaler wraps each transformer
block's ``forward`` in ``torch.autocast(..., dtype=torch.float16)``, so the branches' matmuls run
in fp16 while LayerNorms, the residual stream (an fp16 branch output is cast to fp32 at its output
boundary before the residual add), the embeddings and the head (``ln_f``, the unembedding and the
logits) run in fp32, as the paper keeps them. Parameter gradients arrive in fp32 (the backward of
autocast's weight cast), where they are unscaled exactly. The trainer must NOT wrap the model's
forward in fp16 autocast itself: that would make the unembedding matmul, which ``F.linear`` casts
to fp16 under autocast, produce fp16 logits with unscaled gradients (the paper computes logits in
fp32). Non-block parameters (embeddings, ``ln_f``, unembeddings) form one unscaled segment,
``"rest"``: their gradients are only checked, filtered and flagged.

Use in a trainer (DeepSpeed's own ``fp16`` / ``bf16`` sections must be off: the engine runs fp32)::

    cfg = ResblockScalingConfig.from_ds_config(ds_config)           # None when the section is absent
    scaler = install_resblock_scaling(model, cfg, world_size=M)      # 1. before activation checkpointing
    ds_adapter.apply_activation_checkpointing(model.blocks, ...)     # 2. wraps the autocast forward
    engine = deepspeed.initialize(model=model, ...)                  # 3. hooks survive .to(device)
    for step ...:
        for micro_batch ...:
            engine.backward(engine(...).loss)                        # no autocast, no loss scaling here
        skip = scaler.check(all_reduce=lambda t: dist.all_reduce(t, op=dist.ReduceOp.MAX))  # 1 host sync
        with skipping_step(engine.basic_optimizer, skip):            # inner optimizer: step is a no-op
            engine.step()                                            # zero_grad etc. still run
        scaler.update()                                              # grow / back off, reset the flags
        metrics.update(scaler.stats())
    checkpoint client state: scaler.state_dict(); on resume scaler.load_state_dict(state, device)

Activation checkpointing (``deepspeed.checkpointing`` or ``torch.utils.checkpoint``) that wraps
``block.forward`` must be applied AFTER :func:`install_resblock_scaling`: the autocast context is
entered inside the wrapped forward, so a block recomputed in backward runs in fp16 exactly as its
forward did (DeepSpeed's checkpoint does not restore autocast state). Installing on a block whose
``forward`` is already wrapped raises :class:`GradScalingError`.

Limits the trainer has to handle (DeepSpeed does not know a step was skipped): the engine's LR
scheduler and ``global_steps`` still advance on a skipped step; a PowerSGD hook commits its error
feedback for the (filtered) gradients of a skipped step unless told to stage it; ZeRO-3 with partial
optimizer offload steps a second inner optimizer (``engine.optimizer.backup_optimizer``), which
:func:`skipping_step` must patch as well. The flags live until :meth:`ResblockGradScaler.update`:
save checkpoints between steps.
"""

from .config import SECTION, GradScalingConfigError, ResblockScalingConfig
from .install import SkippedStep, install_resblock_scaling, skipping_step
from .scaler import GradScalingError, ResblockGradScaler

__all__ = [
    "SECTION",
    "GradScalingConfigError",
    "GradScalingError",
    "ResblockGradScaler",
    "ResblockScalingConfig",
    "SkippedStep",
    "install_resblock_scaling",
    "skipping_step",
]
