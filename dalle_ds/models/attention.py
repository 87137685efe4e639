"""DALL-E sparse attention: a dense reference and a block-sparse implementation.

Both compute the same function (see :mod:`dalle_ds.models.masks` for the masks):

* ``dense``: one SDPA call with the full boolean ``n x n`` mask. Simple and
  obviously right; costs ``n**2`` scores.
* ``block``: the paper's block idea. Text queries run causal attention over text.
  Image queries are cut into blocks of ``R`` image rows; a block attends all text
  keys plus only the image rows it can see: the previous row and its own for
  ``row`` layers, the ``k // 2`` rows above and its own for ``conv``, and for
  ``column`` layers the image is transposed first, so a column becomes a row and
  a block needs only its own rows. The blocks ride in the batch dimension; each
  runs two attention calls, over the text keys (no mask) and over its image
  window (a small bias, or plain causal for columns), merged exactly by their
  log-sum-exps (:mod:`.split_kernels`: CPU and CUDA kernels), so the text keys
  are read, not copied per block. Elsewhere one batched SDPA call with the text
  keys copied into each block. No tensor of ``n x n`` (or image x image) scores
  is ever formed.
* ``flex``: PyTorch's FlexAttention with a BlockMask of the same masks (:mod:`.flex`); forward
  only on the CPU.

``auto`` picks ``dense`` or ``block`` per call from the device and the full sequence length; see
:func:`resolve_attention_impl`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .flex import check_backward, flex_attention
from .kv_cache import BoundedKVCache, KVCache
from .masks import ATTENTION_KINDS, allowed, attention_mask
from .split_kernels import SPLIT_KERNELS, SplitKernels, split_kernels_for

__all__ = [
    "ATTENTION_IMPLS",
    "AUTO_CPU_DENSE_MAX_LEN",
    "BoundedKVCache",
    "KVCache",
    "SparseAttention",
    "block_attention",
    "dense_attention",
    "flex_attention",
    "resolve_attention_impl",
    "sparse_attention",
]

ATTENTION_IMPLS = ("auto", "block", "dense", "flex")

AUTO_CPU_DENSE_MAX_LEN = 128
"""``auto`` on the CPU runs ``dense`` for sequences of at most this many positions, ``block`` above.

Measured with ``scripts/bench_attention.py`` (forward + backward, fp32, 1 thread, the 64-layer
mix; table in docs/benchmarks.md, "Short sequences"): up to 128 positions (the tiny and demo presets
are 80 and 97) dense was as fast or faster in 7 of 8 runs (block 0.63-1.11x dense's speed); from 137
positions block was faster in 6 of 7 (0.93-1.68x), and 2.7x at the paper's 1280."""


def resolve_attention_impl(impl: str, device_type: str, seq_len: int, needs_grad: bool = True) -> str:
    """What ``impl`` runs as on ``device_type`` for a full sequence of ``seq_len`` (text_len + grid**2).

    ``block``, ``dense`` and ``flex`` stay; ``flex`` where a backward is needed (``needs_grad``) and
    the device has none (the CPU) raises :func:`.flex.check_backward`'s error. ``auto`` on the CPU:
    ``dense`` when ``seq_len <= AUTO_CPU_DENSE_MAX_LEN`` (one SDPA call beats the block path's
    gathers on short sequences), else ``block`` (its split-softmax CPU flash kernels); both
    measured. On any other device (CUDA): ``block`` in its one-SDPA-call form; not timed against
    dense on a GPU yet, chosen as it computes ~4x fewer scores at the paper's size (64-layer mix)
    and forms no ``n x n`` tensor. ``auto`` never picks ``flex``: it stays ``block`` on CUDA until a
    GPU has timed flex against it, and it picks only paths that run backward where gradients are
    needed (flex has none on the CPU).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl={impl!r}: must be one of {ATTENTION_IMPLS}")
    if impl == "flex" and needs_grad:
        check_backward(device_type)
    if impl != "auto":
        return impl
    if device_type == "cpu":
        return "dense" if seq_len <= AUTO_CPU_DENSE_MAX_LEN else "block"
    return "block"


_MASK_CACHE: dict[tuple, torch.Tensor] = {}


def _cached(key: tuple, build) -> torch.Tensor:
    mask = _MASK_CACHE.get(key)
    if mask is None:
        if len(_MASK_CACHE) > 64:
            _MASK_CACHE.clear()
        mask = _MASK_CACHE[key] = build()
    return mask


def _full_mask(kind: str, text_len: int, grid_size: int, conv_kernel: int, device) -> torch.Tensor:
    key = ("dense", kind, text_len, grid_size, conv_kernel, device)
    return _cached(key, lambda: attention_mask(kind, text_len, grid_size, conv_kernel, device))


def dense_attention(q, k, v, kind: str, text_len: int, grid_size: int, conv_kernel: int = 11):
    """Reference: SDPA with the full boolean mask. q, k, v: (B, H, n, d), n <= text_len + grid**2."""
    n = q.shape[-2]
    mask = _full_mask(kind, text_len, grid_size, conv_kernel, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:n, :n])


@dataclass(frozen=True)
class TilePlan:
    """How image queries are cut into tiles and which image keys (a window) each tile reads.

    Tiles are ``rows x cols`` rectangles of the image grid (the transposed grid's rows for
    ``column`` layers); the window of a tile covers every key any of its queries may see.
    Window positions outside the image are clamped to a valid index and masked out.
    """

    n_tiles: int
    q_len: int  # queries per tile
    k_len: int  # window keys per tile
    q_index: torch.Tensor | None  # (n_tiles * q_len,) raster index of each query in tile order; None = raster
    q_inverse: torch.Tensor | None  # tile order -> raster order
    k_index: torch.Tensor  # (n_tiles * k_len,) raster index of each window key
    allowed: torch.Tensor | None  # bool (n_tiles, q_len, k_len); None when the tile is plain causal
    causal: bool


def _divisor_at_most(n: int, limit: int) -> int:
    return max(r for r in range(1, min(limit, n) + 1) if n % r == 0)


def tile_plan(
    kind: str, grid_size: int, conv_kernel: int = 11, block_rows: int = 2, conv_cols: int = 0, device=None
) -> TilePlan:
    """The tiling each layer kind uses (see the module docstring)."""
    W = grid_size
    if kind == "column":
        # One (transposed) column per tile: same-column keys in the same order, i.e. plain causal.
        r, c = torch.meshgrid(torch.arange(W, device=device), torch.arange(W, device=device), indexing="ij")
        q_index = (r * W + c).t().flatten()  # column-major raster indices
        return TilePlan(W, W, W, q_index, torch.argsort(q_index), q_index, None, True)
    if kind not in ("row", "conv"):
        raise ValueError(f"kind={kind!r}: must be one of {ATTENTION_KINDS}")
    h = conv_kernel // 2 if kind == "conv" else 0
    look = h if kind == "conv" else 1  # rows above a tile its queries can see
    R = _divisor_at_most(W, block_rows)
    # Narrow conv tiles read fewer keys but the CPU kernel runs small tiles slowly: full rows
    # (conv_cols=0) measured fastest at the paper's size (scripts/bench_attention.py).
    C = _divisor_at_most(W, conv_cols) if kind == "conv" and conv_cols > 0 else W
    nr, nc = W // R, W // C
    ar = lambda n: torch.arange(n, device=device)  # noqa: E731
    # Query coordinates (tile, query-in-tile) and window coordinates (tile, key-in-window).
    tr, tc = ar(nr).repeat_interleave(nc), ar(nc).repeat(nr)  # tile row / col index
    qr = tr[:, None] * R + ar(R).repeat_interleave(C)[None, :]
    qc = tc[:, None] * C + ar(C).repeat(R)[None, :]
    kw = C + 2 * h if kind == "conv" else W
    kr = tr[:, None] * R - look + ar(R + look).repeat_interleave(kw)[None, :]
    kc = tc[:, None] * C - (h if kind == "conv" else 0) + ar(kw).repeat(R + look)[None, :]
    valid = (kr >= 0) & (kc >= 0) & (kc < W)
    ok = valid[:, None, :] & allowed(
        kind, qr[:, :, None], qc[:, :, None], kr[:, None, :], kc[:, None, :], W, conv_kernel
    )
    q_index = (qr * W + qc).flatten()
    identity = nc == 1  # full-row tiles are already in raster order
    k_index = (kr.clamp(min=0) * W + kc.clamp(0, W - 1)).flatten()
    return TilePlan(
        nr * nc,
        R * C,
        (R + look) * kw,
        None if identity else q_index,
        None if identity else torch.argsort(q_index),
        k_index,
        ok,
        False,
    )


def _tiles_in_batch(x, n_tiles: int):
    """(B, H, N, d) -> (B * n_tiles, H, N / n_tiles, d): consecutive queries become batch entries.

    A view when ``x`` is laid out as (B, N, H, d) in memory, which is how the CPU flash kernel
    reads and writes its tensors; otherwise one copy.
    """
    B, H, N = x.shape[:3]
    return x.transpose(1, 2).reshape(B * n_tiles, N // n_tiles, H, *x.shape[3:]).transpose(1, 2)


def _tiles_out_of_batch(x, batch: int):
    """Inverse of :func:`_tiles_in_batch`: (B * n_tiles, H, L, ...) -> (B, H, n_tiles * L, ...)."""
    H = x.shape[1]
    return x.transpose(1, 2).reshape(batch, -1, H, *x.shape[3:]).transpose(1, 2)


def _positions(x, index):
    """Select positions (dim 2 of (B, H, N, d)) and return them (B, H, len(index), d) in (B, L, H, d) memory."""
    return x.transpose(1, 2).index_select(1, index).transpose(1, 2)


class _SplitSoftmaxImageAttention(torch.autograd.Function):
    """Image queries over [all text keys] + [their tile's image window] in one softmax.

    The two key sets run as separate attention calls of ``kernels`` (each also returns its
    log-sum-exp) and are merged exactly through their log-sum-exps, so text keys are read once,
    never copied per tile, and each call takes the fastest kernel its mask allows: the text part
    has no mask, column tiles are plain causal. Backward reruns the kernels' backward for each part
    with the merged output and log-sum-exp, which yields the exact gradient of the joint softmax.
    Tiles ride in the batch dimension so the tensors keep their (B, L, H, d) memory layout.
    """

    @staticmethod
    def forward(ctx, q, kt, vt, kw, vw, bias, causal: bool, n_tiles: int, kernels: SplitKernels):
        # q: (B, H, N, d) image queries in tile order; kt, vt: (B, H, T, d);
        # kw, vw: (B * n_tiles, H, S_w, d) windows; bias: additive (B * n_tiles, 1, L, S_w) or None.
        B = q.shape[0]
        ow, lw, aux_w = kernels.forward(_tiles_in_batch(q, n_tiles), kw, vw, causal, bias)
        ow, lw = _tiles_out_of_batch(ow, B), _tiles_out_of_batch(lw, B)  # (B, H, N, d), (B, H, N)
        aux_t = None
        if kt.shape[2]:
            ot, lt, aux_t = kernels.forward(q, kt, vt, False, None)
            # Merge in (B, N, H) order, the kernels' memory layout.
            ot, lt, ow, lw = ot.transpose(1, 2), lt.transpose(1, 2), ow.transpose(1, 2), lw.transpose(1, 2)
            lse = torch.logaddexp(lt, lw)
            o = ot * torch.exp(lt - lse).unsqueeze(-1) + ow * torch.exp(lw - lse).unsqueeze(-1)
            o, lse = o.to(q.dtype).transpose(1, 2), lse.transpose(1, 2)  # lse stays fp32, as the kernels'
        else:
            o, lse = ow, lw
        ctx.save_for_backward(q, kt, vt, kw, vw, o, lse)
        ctx.bias, ctx.causal, ctx.n_tiles, ctx.kernels, ctx.aux = bias, causal, n_tiles, kernels, (aux_w, aux_t)
        return o

    @staticmethod
    def backward(ctx, grad):
        q, kt, vt, kw, vw, o, lse = ctx.saved_tensors
        B, nt, kernels = q.shape[0], ctx.n_tiles, ctx.kernels
        aux_w, aux_t = ctx.aux
        grad = grad.transpose(1, 2).contiguous().transpose(1, 2)  # no copy when already (B, N, H, d)
        tiled = (_tiles_in_batch(x, nt) for x in (grad, q))
        dq, dkw, dvw = kernels.backward(
            *tiled, kw, vw, _tiles_in_batch(o, nt), _tiles_in_batch(lse, nt), ctx.causal, ctx.bias, aux_w
        )
        dq = _tiles_out_of_batch(dq, B)
        if kt.shape[2]:
            dqt, dkt, dvt = kernels.backward(grad, q, kt, vt, o, lse, False, None, aux_t)
            dq = dq + dqt
        else:
            dkt, dvt = torch.zeros_like(kt), torch.zeros_like(vt)
        return dq, dkt, dvt, dkw, dvw, None, None, None, None


def _image_attention(qi, ki, vi, kt, vt, plan: TilePlan, kernels: SplitKernels | None):
    """Attention of the image queries (B, H, N, d) over all text keys plus their tile's window:
    split and merged by ``kernels``, or (None) one SDPA call with the text keys copied per tile."""
    B, H, N, d = qi.shape
    nt, L, S = plan.n_tiles, plan.q_len, plan.k_len
    q = qi if plan.q_index is None else _positions(qi, plan.q_index)  # tile order
    kw = _tiles_in_batch(_positions(ki, plan.k_index), nt)  # (B * nt, H, S, d)
    vw = _tiles_in_batch(_positions(vi, plan.k_index), nt)
    key = (id(plan), B, qi.dtype)
    if kernels is not None:
        bias = None
        if not plan.causal:

            def build_bias():
                # Rows padded to a multiple of 16 elements (the alignment the CUDA kernels read a
                # bias with), then sliced back: a view with the same values.
                padded = -(-S // 16) * 16
                full = torch.zeros((B * nt, 1, L, padded), dtype=qi.dtype, device=qi.device)
                full[..., :S].masked_fill_(~plan.allowed.unsqueeze(1).repeat(B, 1, 1, 1), float("-inf"))
                return full[..., :S]

            bias = _cached(("bias", kernels.name) + key, build_bias)
        o = _SplitSoftmaxImageAttention.apply(q, kt, vt, kw, vw, bias, plan.causal, nt, kernels)
    else:  # one SDPA call, text keys copied into every tile
        T = kt.shape[2]

        def with_text(window, text):  # (B * nt, H, T + S, d)
            text = text.unsqueeze(1).expand(B, nt, H, T, d).reshape(B * nt, H, T, d)
            return torch.cat([text, window], dim=2)

        def build_mask():
            img = plan.allowed if not plan.causal else torch.ones(L, S, dtype=torch.bool, device=qi.device).tril()
            img = img.expand(nt, L, S)
            return torch.cat([img.new_ones(nt, L, T), img], dim=-1).unsqueeze(1).repeat(B, 1, 1, 1)

        mask = _cached(("mask", kt.shape[2]) + key, build_mask)
        o = F.scaled_dot_product_attention(_tiles_in_batch(q, nt), with_text(kw, kt), with_text(vw, vt), attn_mask=mask)
        o = _tiles_out_of_batch(o, B)
    return o if plan.q_inverse is None else _positions(o, plan.q_inverse)


def block_attention(
    q,
    k,
    v,
    kind: str,
    text_len: int,
    grid_size: int,
    conv_kernel: int = 11,
    block_rows: int = 2,
    conv_cols: int = 0,
    fused=None,
):
    """Block-sparse DALL-E attention. q, k, v: (B, H, n, d) with n = text_len + grid**2.

    ``fused`` picks how image queries combine text keys and their image window: True (the default
    where the device has them: CPU, CUDA) runs them as two calls of the device's split-softmax
    kernels merged by log-sum-exp (:mod:`.split_kernels`; text keys read once, never copied), a
    name from :data:`.split_kernels.SPLIT_KERNELS` picks those kernels (``"math"``: the plain-ops
    reference), False makes one SDPA call with the text keys copied into every tile (any device).
    """
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {ATTENTION_KINDS}")
    T, W = text_len, grid_size
    n = q.shape[2]
    if n != T + W * W:
        raise ValueError(f"block attention needs the full sequence: n={n}, text_len + grid**2 = {T + W * W}")
    if isinstance(fused, str):
        kernels = SPLIT_KERNELS[fused]
    elif fused is False:
        kernels = None
    else:
        kernels = split_kernels_for(q)
        if kernels is None and fused:
            raise ValueError(f"block attention: no split-softmax kernels on {q.device.type} for {tuple(q.shape)}")
    key = (kind, W, conv_kernel, block_rows, conv_cols, q.device)
    if key not in _PLAN_CACHE:  # plans are never evicted: their ids key the cached masks
        _PLAN_CACHE[key] = tile_plan(kind, W, conv_kernel, block_rows, conv_cols, q.device)
    plan = _PLAN_CACHE[key]
    qt, qi = q.split([T, W * W], dim=2)
    kt, ki = k.split([T, W * W], dim=2)
    vt, vi = v.split([T, W * W], dim=2)
    oi = _image_attention(qi, ki, vi, kt, vt, plan, kernels)
    if T == 0:
        return oi
    ot = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
    # Concatenate in (B, n, H, d) memory order so the module's head merge is a free view.
    return torch.cat([ot.transpose(1, 2), oi.transpose(1, 2)], dim=1).transpose(1, 2)


_PLAN_CACHE: dict[tuple, TilePlan] = {}


def sparse_attention(
    q, k, v, kind: str, text_len: int, grid_size: int, conv_kernel: int = 11, impl: str = "block", block_rows: int = 2
):
    """Dispatch to an implementation ('auto': :func:`resolve_attention_impl`); 'block' and 'flex'
    fall back to 'dense' for partial sequences (prefills when sampling)."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    impl = resolve_attention_impl(impl, q.device.type, text_len + grid_size**2, needs_grad)
    if q.shape[-2] == text_len + grid_size**2:
        if impl == "block":
            return block_attention(q, k, v, kind, text_len, grid_size, conv_kernel, block_rows)
        if impl == "flex":
            return flex_attention(q, k, v, kind, text_len, grid_size, conv_kernel)
    return dense_attention(q, k, v, kind, text_len, grid_size, conv_kernel)


class SparseAttention(nn.Module):
    """Multi-head self-attention with one of the DALL-E masks (row, column or conv).

    ``impl``: 'block', 'dense', 'flex' or 'auto' (resolved per forward from the input's device, see
    :func:`resolve_attention_impl`)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        kind: str,
        text_len: int,
        grid_size: int,
        conv_kernel: int = 11,
        impl: str = "block",
        block_rows: int = 2,
        dropout: float = 0.0,
    ):
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"kind={kind!r}: must be one of {ATTENTION_KINDS}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"impl={impl!r}: must be one of {ATTENTION_IMPLS}")
        self.n_heads, self.kind, self.impl = n_heads, kind, impl
        self.text_len, self.grid_size = text_len, grid_size
        self.conv_kernel, self.block_rows = conv_kernel, block_rows
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | BoundedKVCache | None = None) -> torch.Tensor:
        """x: (B, n, D). With ``cache`` (generation, :mod:`dalle_ds.models.kv_cache`), x holds the
        positions after the cached ones: the first call fills the cache, later ones step it."""
        B, n, D = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        if cache is not None and cache.length:
            y = cache.step(q, k, v, self)
        else:
            y = sparse_attention(
                q, k, v, self.kind, self.text_len, self.grid_size, self.conv_kernel, self.impl, self.block_rows
            )  # (B, H, n, hd)
            if cache is not None:
                cache.prefill(k, v, self)
        return self.dropout(self.proj(y.transpose(1, 2).reshape(B, n, D)))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, impl={self.impl!r}, heads={self.n_heads}"
