"""attention_impl=flex (dalle_ds/models/flex.py) on the CPU: forward only, against the dense reference.

Most cases run PyTorch's eager FlexAttention (it applies the mask to every score, so it checks the
mask and the column layers' permutation); the block structure is checked on the BlockMask itself,
and one compiled case runs the fused kernel with tiles skipped (compiling takes ~8 s here).
"""

import pytest
import torch
from conftest import run_script_main

from dalle_ds import DALLE, SparseAttention, get_preset
from dalle_ds.models import flex
from dalle_ds.models.attention import dense_attention, resolve_attention_impl, sparse_attention
from dalle_ds.models.masks import attention_mask
from dalle_ds.planning.layout import Layout, PlanError
from dalle_ds.planning.plan import plan_run

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
NO_CPU_BACKWARD = r"attention_impl=flex: FlexAttention has no CPU backward in torch 2\.13; use block or dense"


@pytest.fixture
def eager(monkeypatch):
    monkeypatch.setattr(flex, "COMPILE", False)


def qkv(batch, heads, n, dim=16):
    """q, k, v as SparseAttention's projection lays them out: views of one (B, n, 3, H, d) tensor."""
    return torch.randn(batch, n, 3, heads, dim).permute(2, 0, 3, 1, 4)


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
@pytest.mark.parametrize("text_len,grid,batch,heads", [(6, 4, 2, 2), (5, 7, 1, 3), (0, 5, 3, 1), (16, 9, 2, 4)])
def test_eager_flex_equals_dense(kind, text_len, grid, batch, heads):
    q, k, v = qkv(batch, heads, text_len + grid * grid)
    with torch.no_grad():
        out = flex.flex_attention(q, k, v, kind, text_len, grid, conv_kernel=5, compile=False)
    torch.testing.assert_close(out, dense_attention(q, k, v, kind, text_len, grid, 5), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
@pytest.mark.parametrize("text_len,grid,block_size", [(6, 9, 16), (16, 8, 8), (3, 5, 128)])
def test_the_block_mask_holds_exactly_the_tiles_with_an_allowed_pair(kind, text_len, grid, block_size):
    n = text_len + grid * grid
    mask = attention_mask(kind, text_len, grid, 5)
    order = flex.layer_order(kind, text_len, grid)
    if order is not None:
        mask = mask[order][:, order]
    tiles = -(-n // block_size)
    padded = torch.zeros(tiles * block_size, tiles * block_size, dtype=torch.bool)
    padded[:n, :n] = mask
    expected = padded.view(tiles, block_size, tiles, block_size).any(3).any(1)
    block_mask = flex.flex_block_mask(kind, text_len, grid, 5, block_size=block_size)
    assert torch.equal(block_mask.to_dense()[0, 0].bool(), expected)


def test_column_major_order_makes_column_tiles_denser():
    raster = attention_mask("column", 256, 32).view(10, 128, 10, 128).any(3).any(1)
    skipped = flex.flex_block_mask("column", 256, 32).sparsity()
    assert 1 - raster.float().mean().item() == pytest.approx(0.45) and skipped == pytest.approx(73.0)


def test_compiled_flex_skips_tiles_and_equals_dense():
    text_len, grid = 6, 8  # 70 positions in 16-wide tiles: 5 x 5, of which the mask leaves some empty
    q, k, v = qkv(2, 2, text_len + grid * grid)
    assert flex.flex_block_mask("column", text_len, grid, 5, block_size=16).sparsity() > 30
    with torch.no_grad():
        out = flex.flex_attention(q, k, v, "column", text_len, grid, 5, block_size=16, compile=True)
    torch.testing.assert_close(out, dense_attention(q, k, v, "column", text_len, grid, 5), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_the_dispatcher_runs_flex_on_full_sequences_and_dense_on_partial_ones(kind, eager, monkeypatch):
    text_len, grid = 5, 6
    q, k, v = qkv(2, 2, text_len + grid * grid)
    calls = []
    kernel = flex._kernel
    monkeypatch.setattr(flex, "_kernel", lambda *a: calls.append(1) or kernel(*a))
    with torch.no_grad():
        for m in (text_len, text_len + 7, text_len + grid * grid):
            out = sparse_attention(q[:, :, :m], k[:, :, :m], v[:, :, :m], kind, text_len, grid, 5, impl="flex")
            ref = dense_attention(q[:, :, :m], k[:, :, :m], v[:, :, :m], kind, text_len, grid, 5)
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    assert len(calls) == 1  # the full sequence only


def test_gradients_on_the_cpu_are_a_clear_error_and_no_grad_runs(eager):
    q, k, v = (t.detach().requires_grad_() for t in qkv(1, 2, 6 + 16))
    with pytest.raises(RuntimeError, match=NO_CPU_BACKWARD):
        flex.flex_attention(q, k, v, "row", 6, 4)
    attn = SparseAttention(8, 2, "column", 6, 4, conv_kernel=3, impl="flex")
    x = torch.randn(2, 6 + 16, 8)
    with pytest.raises(RuntimeError, match=NO_CPU_BACKWARD):
        attn(x)  # the module's weights need gradients
    with pytest.raises(RuntimeError, match=NO_CPU_BACKWARD):
        attn(x[:, :9])  # also where the partial sequence would run dense
    with torch.no_grad():
        assert attn(x).shape == x.shape
    with pytest.raises(RuntimeError, match=NO_CPU_BACKWARD):
        resolve_attention_impl("flex", "cpu", 22)
    assert resolve_attention_impl("flex", "cpu", 22, needs_grad=False) == "flex"
    assert resolve_attention_impl("flex", "cuda", 1280) == "flex"


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("seq_len", [80, 1280])
@pytest.mark.parametrize("needs_grad", [True, False])
def test_auto_never_picks_flex(device_type, seq_len, needs_grad):
    assert resolve_attention_impl("auto", device_type, seq_len, needs_grad) in ("block", "dense")


def test_the_plan_refuses_flex_training_on_the_cpu_and_counts_no_score_tiles_on_a_gpu():
    config = get_preset("dalle-tiny").replace(attention_impl="flex")
    ds = {"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}
    layout = Layout(1, 2, 80 * 10**9, 2)
    with pytest.raises(PlanError, match=NO_CPU_BACKWARD):
        plan_run(config, ds, layout, device_type="cpu")
    plans = {impl: plan_run(config.replace(attention_impl=impl), ds, layout) for impl in ("flex", "block")}
    n, heads = config.text_len + config.image_len, config.n_heads
    assert plans["flex"].components["attention_temporaries"] == 2 * heads * n * 4  # one fp32 per query row
    assert plans["flex"].components["attention_temporaries"] < plans["block"].components["attention_temporaries"] / 4
    assert plans["flex"].components["activations"] > 0


def _models():
    torch.manual_seed(0)
    config = get_preset("dalle-tiny")
    dense = DALLE(config.replace(attention_impl="dense")).eval()
    model = DALLE(config.replace(attention_impl="flex")).eval()
    model.load_state_dict(dense.state_dict())
    with torch.no_grad():  # sharper than an untrained model's near-uniform logits (as tests/test_sampling.py)
        for m in (dense, model):
            m.image_emb.weight.mul_(8)
    return config, dense, model


def test_dalle_with_flex_equals_dense_and_samples_the_same_tokens_with_the_kv_cache(eager):
    config, dense, model = _models()
    text = torch.randint(0, config.text_vocab_size, (2, config.text_len))
    codes = torch.randint(0, config.image_vocab_size, (2, config.image_len))
    with torch.no_grad():
        a, b = model(text, codes, return_logits=True), dense(text, codes, return_logits=True)
    torch.testing.assert_close(a.image_logits, b.image_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.text_logits, b.text_logits, atol=1e-5, rtol=1e-5)
    for cache in ("full", "bounded"):
        seeded = {"generator": torch.Generator().manual_seed(1), "top_k": 5, "cache": cache}
        tokens = model.generate(text, **seeded)
        seeded["generator"] = torch.Generator().manual_seed(1)
        assert torch.equal(tokens, dense.generate(text, **seeded))


def test_bench_attention_prints_each_kinds_skipped_tiles(capsys):
    args = ["--sparsity", "--text-len", "16", "--grid", "8", "--conv-kernel", "5", "--flex-block-size", "16"]
    assert run_script_main("bench_attention.py", *args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].endswith("flex blocks of 16: 5^2 tiles")
    for line, kind in zip(lines[1:], ("row", "column", "conv"), strict=True):  # the BlockMask's own figure
        assert line.split()[:2] == [kind, f"{flex.flex_block_mask(kind, 16, 8, 5, block_size=16).sparsity():.1f}%"]
