import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dalle_ds import SparseAttention, block_attention, dense_attention
from dalle_ds.models.attention import resolve_attention_impl


def qkv(batch, heads, n, dim, dtype=torch.float32):
    return [torch.randn(batch, heads, n, dim, dtype=dtype, requires_grad=True) for _ in range(3)]


def grads(out, inputs, weight):
    return torch.autograd.grad((out * weight).sum(), inputs)


CASES = [  # (text_len, grid, heads, block_rows)
    (6, 4, 1, 1),
    (6, 4, 2, 2),
    (5, 6, 3, 3),
    (16, 8, 4, 2),
    (0, 8, 2, 4),
    (3, 7, 2, 2),  # 7 has no divisor 2: falls back to 1-row blocks
    (1, 5, 2, 5),
]


@pytest.mark.parametrize("fused", [True, False], ids=["split-softmax", "gather"])
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
@pytest.mark.parametrize("text_len,grid,heads,block_rows", CASES)
def test_block_matches_dense_reference(kind, text_len, grid, heads, block_rows, fused):
    n = text_len + grid * grid
    q, k, v = qkv(2, heads, n, 16)
    out_b = block_attention(
        q, k, v, kind, text_len, grid, conv_kernel=5, block_rows=block_rows, conv_cols=block_rows + 1, fused=fused
    )
    out_d = dense_attention(q, k, v, kind, text_len, grid, conv_kernel=5)
    torch.testing.assert_close(out_b, out_d, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(out_d)
    for gb, gd in zip(grads(out_b, (q, k, v), w), grads(out_d, (q, k, v), w), strict=True):
        torch.testing.assert_close(gb, gd, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("conv_kernel", [1, 3, 11])
def test_conv_kernel_sizes_match_dense(conv_kernel):
    q, k, v = qkv(1, 2, 4 + 64, 8)
    torch.testing.assert_close(
        block_attention(q, k, v, "conv", 4, 8, conv_kernel, block_rows=2),
        dense_attention(q, k, v, "conv", 4, 8, conv_kernel),
        atol=1e-5,
        rtol=1e-5,
    )


class _ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_block_path_never_forms_image_by_image_scores(kind, fused):
    text_len, grid = 8, 16
    n_img = grid * grid
    q, k, v = qkv(1, 2, text_len + n_img, 8)
    rec = _ShapeRecorder()
    with rec:
        out = block_attention(q, k, v, kind, text_len, grid, conv_kernel=5, block_rows=2, fused=fused)
        out.sum().backward()
    # An n x n (or image x image) score matrix would have two dims >= the image length.
    big = [s for s in rec.shapes if sum(d >= n_img for d in s) >= 2]
    assert not big, f"found score-sized tensors {big[:3]}"
    # The dense reference does form them: the check can fail.
    rec = _ShapeRecorder()
    with rec:
        dense_attention(q, k, v, kind, text_len, grid, conv_kernel=5)
    assert any(sum(d >= n_img for d in s) >= 2 for s in rec.shapes)


def test_module_impls_agree_and_future_tokens_do_not_leak():
    torch.manual_seed(1)
    text_len, grid, d = 4, 6, 32
    dense = SparseAttention(d, 4, "row", text_len, grid, impl="dense")
    block = SparseAttention(d, 4, "row", text_len, grid, impl="block", block_rows=3)
    block.load_state_dict(dense.state_dict())
    x = torch.randn(2, text_len + grid * grid, d)
    torch.testing.assert_close(block(x), dense(x), atol=1e-5, rtol=1e-5)
    y = x.clone()
    y[:, 20:] = torch.randn_like(y[:, 20:])
    torch.testing.assert_close(block(y)[:, :20], block(x)[:, :20], atol=1e-6, rtol=0)


def test_bad_arguments():
    q, k, v = qkv(1, 1, 10, 4)
    with pytest.raises(ValueError, match="full sequence"):
        block_attention(q, k, v, "row", 2, 4)  # 2 + 16 != 10
    with pytest.raises(ValueError, match="impl='flash'"):
        SparseAttention(8, 2, "row", 2, 4, impl="flash")
    with pytest.raises(ValueError, match="impl='flash'"):
        resolve_attention_impl("flash", "cpu", 10)


@pytest.mark.parametrize(
    "device_type,seq_len,expected",
    [
        ("cpu", 80, "dense"),  # dalle-tiny: 16 + 8x8
        ("cpu", 97, "dense"),  # dalle-demo: 16 + 9x9
        ("cpu", 128, "dense"),
        ("cpu", 129, "block"),
        ("cpu", 288, "block"),  # dalle-small: 32 + 16x16
        ("cpu", 1280, "block"),  # the paper's 256 + 32x32
        ("cuda", 80, "block"),
        ("cuda", 1280, "block"),
    ],
)
def test_auto_resolves_by_device_and_sequence_length(device_type, seq_len, expected):
    assert resolve_attention_impl("auto", device_type, seq_len) == expected
    assert resolve_attention_impl("block", device_type, seq_len) == "block"
    assert resolve_attention_impl("dense", device_type, seq_len) == "dense"


@pytest.mark.parametrize("text_len,grid,expected", [(4, 6, "dense"), (4, 12, "block")])  # 40 and 148 positions
@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_auto_module_runs_the_resolved_path_and_equals_dense(monkeypatch, kind, text_len, grid, expected):
    import dalle_ds.models.attention as attention

    calls = []
    for name in ("block_attention", "dense_attention"):
        fn = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _fn=fn, _name=name, **kw: calls.append(_name) or _fn(*a, **kw))
    torch.manual_seed(0)
    auto = SparseAttention(32, 4, kind, text_len, grid, conv_kernel=5, impl="auto", block_rows=2)
    dense = SparseAttention(32, 4, kind, text_len, grid, conv_kernel=5, impl="dense")
    dense.load_state_dict(auto.state_dict())
    x = torch.randn(2, text_len + grid * grid, 32, requires_grad=True)
    calls.clear()
    out = auto(x)
    assert calls == [f"{expected}_attention"]
    ref = dense(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(ref)
    for ga, gd in zip(grads(out, (x,), w), grads(ref, (x,), w), strict=True):
        torch.testing.assert_close(ga, gd, atol=1e-5, rtol=1e-5)
