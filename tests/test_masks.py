import pytest
import torch

from dalle_ds import attention_mask, layer_schedule
from dalle_ds.models.masks import image_mask


def visible_image_keys(mask, text_len, image_pos_1based):
    """1-based image positions a 1-based image query may attend."""
    row = mask[text_len + image_pos_1based - 1, text_len:]
    return [int(j) + 1 for j in torch.nonzero(row).flatten()]


def test_blog_worked_example_row():
    # docs/design.md, "Attention masks": 6 text tokens, 4x4 grid; image token 8 sees 4, 5, 6, 7 and
    # itself, plus all text.
    m = attention_mask("row", text_len=6, grid_size=4)
    assert m.shape == (22, 22) and m.dtype == torch.bool
    assert visible_image_keys(m, 6, 8) == [4, 5, 6, 7, 8]
    assert m[6 + 7, :6].all()
    assert int(m[6 + 7].sum()) == 6 + 5


def test_blog_worked_example_column():
    # Image token 16 sees 4, 8, 12 and itself, plus all text.
    m = attention_mask("column", text_len=6, grid_size=4)
    assert visible_image_keys(m, 6, 16) == [4, 8, 12, 16]
    assert m[6 + 15, :6].all()
    assert int(m[6 + 15].sum()) == 6 + 4


def test_text_queries_are_causal_over_text_only():
    for kind in ("row", "column", "conv"):
        m = attention_mask(kind, text_len=5, grid_size=3, conv_kernel=3)
        assert torch.equal(m[:5, :5], torch.ones(5, 5, dtype=torch.bool).tril())
        assert not m[:5, 5:].any()


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
@pytest.mark.parametrize("text_len,grid", [(0, 3), (4, 5), (7, 8)])
def test_every_mask_is_causal_and_sees_self_and_all_text(kind, text_len, grid):
    m = attention_mask(kind, text_len, grid, conv_kernel=5)
    n = text_len + grid * grid
    assert not (m & ~torch.ones(n, n, dtype=torch.bool).tril()).any(), "a query sees a future key"
    assert m.diagonal().all(), "every position sees itself"
    assert m[text_len:, :text_len].all(), "every image query sees all text"


def test_row_window_wraps_into_previous_row():
    # 5x5 grid: query (2, 1) -> raster 11 sees raster 6..11: (1, 1)..(1, 4), (2, 0), (2, 1).
    m = image_mask("row", 5)
    assert torch.nonzero(m[11]).flatten().tolist() == [6, 7, 8, 9, 10, 11]
    # First image token sees only itself among image tokens.
    assert torch.nonzero(m[0]).flatten().tolist() == [0]


def test_column_mask_is_same_column_earlier_rows():
    w = 6
    m = image_mask("column", w)
    for p in range(w * w):
        expect = [q for q in range(p + 1) if q % w == p % w]
        assert torch.nonzero(m[p]).flatten().tolist() == expect


def test_conv_mask_is_causal_half_of_kxk_neighbourhood_without_wrap():
    w, k = 7, 5
    h = k // 2
    m = image_mask("conv", w, conv_kernel=k)
    for r in range(w):
        for c in range(w):
            keys = {(int(q) // w, int(q) % w) for q in torch.nonzero(m[r * w + c]).flatten()}
            expect = {
                (r2, c2)
                for r2 in range(max(0, r - h), r + 1)
                for c2 in range(max(0, c - h), min(w, c + h + 1))
                if r2 < r or c2 <= c
            }
            assert keys == expect, (r, c)
    # Interior query: the full causal half, k//2 rows of k plus k//2 + 1 on its own row.
    assert int(m[3 * w + 3].sum()) == h * k + h + 1
    # No wrap: the first column never sees the previous row's last column.
    assert not m[2 * w, 2 * w - 1]


def test_layer_schedule_matches_paper_rule():
    assert layer_schedule(4) == ["row", "column", "row", "conv"]
    assert layer_schedule(5)[:4] == ["row", "column", "row", "row"]
    s = layer_schedule(64)
    assert s[-1] == "conv" and s.count("conv") == 1
    for i, kind in enumerate(s[:-1], start=1):
        assert kind == ("column" if (i - 2) % 4 == 0 else "row")
    assert layer_schedule(1) == ["conv"]
    with pytest.raises(ValueError, match="n_layers"):
        layer_schedule(0)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="kind='diag'"):
        attention_mask("diag", 2, 3)
    with pytest.raises(ValueError, match="conv_kernel=4"):
        attention_mask("conv", 2, 3, conv_kernel=4)
