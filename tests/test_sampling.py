"""The on-device sampler: the exponential-race draw, no host reads in the token loop, candidates
sharing one prefill, and the bounded KV cache against the full one and against recomputation."""

import pytest
import torch
import torch.nn.functional as F

from dalle_ds import DALLE, get_preset
from dalle_ds.models.dalle import device_generator, sample_logits
from dalle_ds.models.kv_cache import BoundedKVCache, KVCache


def _model(**overrides):
    torch.manual_seed(0)
    config = get_preset("dalle-tiny").replace(**overrides)
    model = DALLE(config).eval()
    with torch.no_grad():  # sharper than an untrained model's near-uniform logits (as tests/test_dalle.py)
        model.image_emb.weight.mul_(8)
    return config, model, torch.randint(0, config.text_vocab_size, (3, config.text_len))


def test_the_draw_is_the_old_host_multinomial_token_for_token_on_the_cpu():
    torch.manual_seed(1)
    logits = torch.randn(6, 300) * 3
    for seed in range(4):
        for kw in ({}, {"top_k": 7}, {"top_p": 0.5, "temperature": 0.8}):
            from dalle_ds.models.dalle import filter_logits

            probs = filter_logits(logits / kw.get("temperature", 1.0), kw.get("top_k", 0), kw.get("top_p", 1.0))
            old = torch.multinomial(probs.softmax(-1), 1, generator=torch.Generator().manual_seed(seed))
            new = sample_logits(logits, generator=torch.Generator().manual_seed(seed), **kw)
            assert torch.equal(new, old)


def test_the_draw_follows_the_distribution():
    p = torch.tensor([0.5, 0.25, 0.15, 0.1, 0.0])
    g = torch.Generator().manual_seed(0)
    tokens = sample_logits(p.log().expand(40000, -1), generator=g)[:, 0]
    freq = torch.bincount(tokens, minlength=5).float() / tokens.numel()
    assert freq[4] == 0  # a zero-probability token is never drawn
    torch.testing.assert_close(freq, p, atol=0.01, rtol=0)
    top2 = sample_logits(p.log().expand(20000, -1), top_k=2, generator=g)[:, 0]
    freq = torch.bincount(top2, minlength=5).float() / top2.numel()
    torch.testing.assert_close(freq, torch.tensor([2 / 3, 1 / 3, 0, 0, 0]), atol=0.015, rtol=0)


def test_a_generator_on_another_device_seeds_one_on_the_model_device_deterministically(monkeypatch):
    g = torch.Generator().manual_seed(0)
    assert device_generator(g, "cpu") is g and device_generator(None, "cpu") is None
    sources = [torch.Generator().manual_seed(s) for s in (5, 5, 6)]

    class OnDevice:  # stands in for torch.Generator(device="cuda") on this CPU-only machine
        def __init__(self, device):
            self.device = torch.device(device)

        def manual_seed(self, seed):
            self.seed = seed
            return self

    monkeypatch.setattr(torch, "Generator", OnDevice)
    derived = [device_generator(src, "cuda") for src in sources]
    assert all(d.device == torch.device("cuda") for d in derived)
    assert derived[0].seed == derived[1].seed != derived[2].seed


@pytest.mark.parametrize("cache", ["full", "bounded"])
def test_generate_never_reads_a_tensor_value_back(cache, monkeypatch):
    config, model, text = _model()
    prime = torch.randint(0, config.image_vocab_size, (3, config.image_grid))
    ref = model.generate(text.repeat_interleave(2, 0), top_k=5, top_p=0.9, prime=prime.repeat_interleave(2, 0),
                         cache=cache, generator=torch.Generator().manual_seed(0))  # fmt: skip

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor value inside generate")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    with pytest.raises(AssertionError, match="host read"):
        torch.ones(1).item()  # the guard is live
    out = model.generate(text, top_k=5, top_p=0.9, prime=prime, cache=cache, num_samples=2,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    monkeypatch.undo()
    assert torch.equal(out, ref) and torch.equal(out[:, : config.image_grid], prime.repeat_interleave(2, 0))


@pytest.mark.parametrize("kw", [{}, {"top_k": 5}, {"top_p": 0.8, "temperature": 0.7}])
def test_the_bounded_cache_samples_the_same_tokens_as_the_full_cache_and_recomputation(kw):
    config, model, text = _model()
    for seed in range(2):
        runs = {
            name: model.generate(text, generator=torch.Generator().manual_seed(seed), **opts, **kw)
            for name, opts in {
                "recompute": {"use_cache": False},
                "full": {"cache": "full"},
                "bounded": {"cache": "bounded"},
            }.items()
        }
        assert torch.equal(runs["bounded"], runs["full"]) and torch.equal(runs["full"], runs["recompute"])


@pytest.mark.parametrize("rows", [0, 1, 5])  # 5 primed rows overflow the row and conv rings (9 and 24 slots)
def test_bounded_cache_step_logits_match_the_full_forward(rows):
    config, model, text = _model(n_layers=6)  # row, column, row, row, row, conv
    W = config.image_grid
    codes = torch.randint(0, config.image_vocab_size, (3, config.image_len))
    full = model(text, codes, return_logits=True).image_logits
    caches = [BoundedKVCache() for _ in model.blocks]
    L0 = rows * W
    h = model.embed(text, codes[:, :L0])
    with torch.no_grad():
        for i in range(L0, config.image_len):
            for block, cache in zip(model.blocks, caches, strict=True):
                h = block(h, cache)
            step = F.linear(model.ln_f(h[:, -1]), model.image_emb.weight)
            torch.testing.assert_close(step, full[:, i], atol=1e-4, rtol=1e-4)
            h = model._image_embed(codes[:, i : i + 1], i)
    ring = {"row": W + 1, "column": W * W, "conv": (config.conv_kernel // 2 + 1) * W}
    for block, cache in zip(model.blocks, caches, strict=True):
        assert cache.img_k.shape[2] == ring[block.attn.kind] and cache.text_k.shape[2] == config.text_len


def test_bounded_cache_rejects_what_it_cannot_hold():
    config, model, text = _model()
    attn = model.blocks[0].attn
    k = torch.zeros(1, 4, config.text_len - 1, 32)
    with pytest.raises(ValueError, match="text positions"):
        BoundedKVCache().prefill(k, k, attn)
    cache = BoundedKVCache()
    cache.prefill(torch.zeros(1, 4, config.text_len, 32), torch.zeros(1, 4, config.text_len, 32), attn)
    two = torch.zeros(1, 4, 2, 32)
    with pytest.raises(ValueError, match="one position at a time"):
        cache.step(two, two, two, attn)
    with pytest.raises(ValueError, match="cache="):
        model.generate(text, cache="ring")


@pytest.mark.parametrize("cache", ["full", "bounded"])
def test_candidates_sharing_one_prefill_equal_a_batch_of_repeated_captions(cache):
    config, model, text = _model()
    prime = torch.randint(0, config.image_vocab_size, (2, 2 * config.image_grid))
    kw = {"top_k": 8, "temperature": 4.0}  # hot enough that candidates differ

    def run(**opts):
        return model.generate(generator=torch.Generator().manual_seed(4), **kw, **opts)

    shared = run(text=text[:2], prime=prime, num_samples=3, cache=cache)
    repeated = run(text=text[:2].repeat_interleave(3, 0), prime=prime.repeat_interleave(3, 0), cache=cache)
    plain = run(text=text[:2], prime=prime, num_samples=3, use_cache=False)
    assert shared.shape == (6, config.image_len)
    assert torch.equal(shared, repeated) and torch.equal(shared, plain)
    assert len({tuple(row) for row in shared.tolist()}) == 6  # the candidates differ


def test_the_full_cache_still_steps_several_positions_at_once():
    config, model, text = _model()
    codes = torch.randint(0, config.image_vocab_size, (3, config.image_len))
    full = model(text, codes, return_logits=True).image_logits
    caches = [KVCache() for _ in model.blocks]
    with torch.no_grad():
        h = model.embed(text, codes[:, :0])
        for block, cache in zip(model.blocks, caches, strict=True):
            h = block(h, cache)
        h = model._image_embed(codes[:, :5], 0)  # five positions in one step
        for block, cache in zip(model.blocks, caches, strict=True):
            h = block(h, cache)
        logits = F.linear(model.ln_f(h), model.image_emb.weight)
    torch.testing.assert_close(logits, full[:, 1:6], atol=1e-4, rtol=1e-4)


def _null_text(config, n):
    from dalle_ds.models.dalle import null_text

    return null_text(config, n)  # the null caption: every position padding


@pytest.mark.parametrize("cache", ["full", "bounded"])
def test_guidance_scale_zero_samples_as_the_null_caption_and_one_as_the_caption(cache):
    config, model, text = _model()

    def run(t, **kw):
        return model.generate(t, top_k=5, cache=cache, generator=torch.Generator().manual_seed(3), **kw)

    plain, null = run(text), run(_null_text(config, 3))
    assert not torch.equal(plain, null)
    assert torch.equal(run(text, cond_scale=1.0), plain)
    assert torch.equal(run(text, cond_scale=0.0), null)  # null + 0 * (text - null): the null logits exactly


def test_guided_greedy_tokens_follow_the_guidance_formula():
    """Greedy decoding (top_k=1) by hand with ``null + s * (text - null)`` over recomputed logits:
    the uncached, full-cache and bounded-cache guided samplers pick the same tokens, primed rows and
    candidates sharing a prefill included."""
    config, model, text = _model()
    with torch.no_grad():  # back to the initial weights: sharpened codes would drown what the caption adds
        model.image_emb.weight.div_(8)
    s, null = 5.0, _null_text(config, 3)
    prime = torch.randint(0, config.image_vocab_size, (3, config.image_grid))
    codes, plain = prime.clone(), prime.clone()
    for _ in range(config.image_grid, config.image_len):
        cond, uncond = model.next_image_logits(text, codes), model.next_image_logits(null, codes)
        codes = torch.cat([codes, (uncond + s * (cond - uncond)).argmax(-1, keepdim=True)], 1)
        plain = torch.cat([plain, model.next_image_logits(text, plain).argmax(-1, keepdim=True)], 1)
    assert not torch.equal(codes, plain)  # guidance changed the greedy choice
    for opts in ({"use_cache": False}, {"cache": "full"}, {"cache": "bounded"}):
        assert torch.equal(model.generate(text, top_k=1, cond_scale=s, prime=prime, **opts), codes), opts
        pairs = model.generate(text, top_k=1, cond_scale=s, prime=prime, num_samples=2, **opts)
        assert torch.equal(pairs, codes.repeat_interleave(2, 0)), opts


def test_guidance_raises_how_much_more_likely_the_samples_are_under_the_caption():
    """The log-likelihood ratio log p(x | caption) - log p(x | null), per token of the samples, grows
    with the scale: 0 samples from the null caption's model, 1 from the caption's, 3 beyond it."""
    config, model, text = _model()
    null = _null_text(config, 3)

    def log_ratio(codes):
        def logp(t):
            logits = model(t.repeat_interleave(8, 0), image_codes=codes, return_logits=True).image_logits
            return logits.log_softmax(-1).gather(-1, codes[..., None]).mean()

        with torch.no_grad():
            return float(logp(text) - logp(null))

    ratios = [
        log_ratio(model.generate(text, num_samples=8, cond_scale=s, generator=torch.Generator().manual_seed(0)))
        for s in (0.0, 1.0, 3.0)
    ]
    assert ratios[0] < ratios[1] < ratios[2], ratios
    assert ratios[1] > 0  # samples of the caption's model are more likely under the caption
