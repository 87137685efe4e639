"""The block path's split softmax: image queries over the text keys and over their tile's window as
two kernel calls merged by log-sum-exp equal dense attention in values and gradients, with every
kernel set (the CPU flash ops, the plain-ops reference, the CUDA ops' calling conventions emulated on
the CPU), in fp32 and bf16; and the text keys are never copied into the tiles."""

import types

import pytest
import torch
from test_attention import CASES, _ShapeRecorder, grads, qkv

import dalle_ds.models.split_kernels as split_kernels
from dalle_ds import block_attention, dense_attention
from dalle_ds.models.split_kernels import SPLIT_KERNELS, split_kernels_for


def _reference(q, k, v, causal, bias):
    """(out, lse) of one call in fp32 plain ops, independent of the kernels under test."""
    s = (q.float() @ k.float().transpose(-1, -2)) / q.shape[-1] ** 0.5
    if bias is not None:
        s = s + bias.float()
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v.float()).to(q.dtype), s.logsumexp(-1)


class EmulatedCudaOps:
    """``torch.ops.aten``'s CUDA attention ops as ``split_kernels`` calls them, computed on the CPU,
    asserting the conventions the CUDA kernels have: FlashAttention only in 16-bit without a bias,
    the memory-efficient kernel's log-sum-exp padded to a multiple of 32 queries (and wanted back so
    in backward), a bias expanded to (B, H, L, S) with 16-element-aligned rows, dropout 0."""

    def __init__(self):
        self.calls = []

    def _scaled_dot_product_flash_attention(self, q, k, v, dropout_p, is_causal):
        assert q.dtype in (torch.float16, torch.bfloat16) and dropout_p == 0.0
        self.calls.append("flash")
        out, lse = _reference(q, k, v, is_causal, None)
        L, S = q.shape[2], k.shape[2]
        rng, unused = torch.tensor([7, 0]), torch.empty(0)
        return out, lse, None, None, L, S, rng, unused, torch.empty(0)

    def _scaled_dot_product_flash_attention_backward(
        self, grad, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, seed, offset
    ):
        assert (max_q, max_k) == (q.shape[2], k.shape[2]) and seed.tolist() == [7, 0] and dropout_p == 0.0
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:3] and lse.is_contiguous()
        self.calls.append("flash_backward")
        return SPLIT_KERNELS["math"].backward(grad, q, k, v, out, lse, is_causal, None, None)

    def _check_bias(self, q, k, bias):
        if bias is not None:
            assert bias.dtype == q.dtype and bias.shape == (*q.shape[:3], k.shape[2])
            assert bias.stride(-1) == 1 and bias.stride(-2) % 16 == 0

    def _scaled_dot_product_efficient_attention(self, q, k, v, bias, compute_lse, dropout_p, is_causal):
        assert compute_lse and dropout_p == 0.0
        self._check_bias(q, k, bias)
        self.calls.append("efficient")
        out, lse = _reference(q, k, v, is_causal, bias)
        L = q.shape[2]
        padded = torch.full((*lse.shape[:-1], -(-L // 32) * 32), float("nan"))  # garbage past L
        padded[..., :L] = lse
        return out, padded, torch.tensor(3), torch.tensor(4)

    def _scaled_dot_product_efficient_attention_backward(
        self, grad, q, k, v, bias, out, lse, seed, offset, dropout_p, grad_input_mask, is_causal
    ):
        L = q.shape[2]
        assert lse.shape[-1] == -(-L // 32) * 32 and (seed.item(), offset.item()) == (3, 4)
        assert list(grad_input_mask) == [True, True, True, False] and dropout_p == 0.0
        self._check_bias(q, k, bias)
        self.calls.append("efficient_backward")
        dq, dk, dv = SPLIT_KERNELS["math"].backward(grad, q, k, v, out, lse[..., :L], is_causal, bias, None)
        return dq, dk, dv, None


@pytest.fixture
def cuda_ops(monkeypatch):
    ops = EmulatedCudaOps()
    monkeypatch.setattr(
        split_kernels,
        "_cuda_ops",
        types.SimpleNamespace(**{name: getattr(ops, name) for name in dir(ops) if name.startswith("_scaled")}),
    )
    return ops


@pytest.mark.parametrize("kernels", ["cpu", "math", "cuda"])
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
@pytest.mark.parametrize("text_len,grid,heads,block_rows", CASES)
def test_split_block_attention_equals_dense_in_fp32(kernels, kind, text_len, grid, heads, block_rows, cuda_ops):
    q, k, v = qkv(2, heads, text_len + grid * grid, 16)
    out = block_attention(q, k, v, kind, text_len, grid, 5, block_rows, conv_cols=block_rows + 1, fused=kernels)
    ref = dense_attention(q, k, v, kind, text_len, grid, conv_kernel=5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(ref)
    for got, want in zip(grads(out, (q, k, v), w), grads(ref, (q, k, v), w), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if kernels == "cuda":  # fp32: no FlashAttention, the memory-efficient kernel for every part
        assert set(cuda_ops.calls) == {"efficient", "efficient_backward"}


@pytest.mark.parametrize("kernels", ["cpu", "math", "cuda"])
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_split_block_attention_in_bf16_is_as_close_to_fp32_dense_as_bf16_dense(kernels, kind, cuda_ops):
    text_len, grid = 16, 8
    q, k, v = qkv(2, 2, text_len + grid * grid, 16)
    w = torch.randn(2, 2, text_len + grid * grid, 16)
    ref32 = dense_attention(q, k, v, kind, text_len, grid, conv_kernel=5)
    want = [ref32, *grads(ref32, (q, k, v), w)]
    q16, k16, v16 = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    out = block_attention(q16, k16, v16, kind, text_len, grid, 5, 2, fused=kernels)
    ref16 = dense_attention(q16, k16, v16, kind, text_len, grid, conv_kernel=5)
    got = [out, *grads(out, (q16, k16, v16), w.bfloat16())]
    dense16 = [ref16, *grads(ref16, (q16, k16, v16), w.bfloat16())]
    for g, d, r in zip(got, dense16, want, strict=True):
        err, dense_err = (g.float() - r).abs().max().item(), (d.float() - r).abs().max().item()
        assert err <= 2 * dense_err + 1e-3 * r.abs().max().item(), (err, dense_err)
    if kernels == "cuda":  # FlashAttention for the text part and the causal column tiles
        assert "flash" in cuda_ops.calls and ("efficient" in cuda_ops.calls) == (kind != "column")


@pytest.mark.parametrize("fused,copied", [(True, False), ("math", False), (False, True)])
def test_text_keys_are_copied_into_the_tiles_only_without_split_kernels(fused, copied):
    text_len, grid, heads, d = 8, 8, 2, 8
    q, k, v = qkv(1, heads, text_len + grid * grid, d)
    rec = _ShapeRecorder()
    with rec:
        block_attention(q, k, v, "row", text_len, grid, conv_kernel=5, block_rows=2, fused=fused).sum().backward()
    tiles, window = grid // 2, 3 * grid  # row tiles of 2 rows read their rows and the one above
    assert ((tiles, heads, text_len + window, d) in rec.shapes) == copied


def test_the_device_picks_its_kernels_and_asking_for_none_is_an_error(monkeypatch):
    import dalle_ds.models.attention as attention

    q = torch.zeros(1, 2, 4 + 16, 16)
    assert split_kernels_for(q).name == "cpu"
    assert split_kernels_for(q.to("meta")).name == "math"  # what the dry run traces
    monkeypatch.setattr(attention, "split_kernels_for", lambda q: None)  # a device without them
    with pytest.raises(ValueError, match=r"no split-softmax kernels on cpu for \(1, 2, 20, 16\)"):
        block_attention(q, q, q, "row", 4, 4, fused=True)
    torch.testing.assert_close(block_attention(q, q, q, "row", 4, 4), dense_attention(q, q, q, "row", 4, 4))


def test_the_cuda_bias_keeps_16_element_rows_and_the_dense_values(cuda_ops):
    # Conv tiles of 1 row at grid 5, kernel 3: windows of (1 + 1) * 5 = 10 keys, 16 apart in memory.
    q, k, v = qkv(1, 1, 2 + 25, 8)
    out = block_attention(q, k, v, "conv", 2, 5, conv_kernel=3, block_rows=1, fused="cuda")
    torch.testing.assert_close(out, dense_attention(q, k, v, "conv", 2, 5, conv_kernel=3), atol=1e-5, rtol=1e-5)
    assert "efficient" in cuda_ops.calls
