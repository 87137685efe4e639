import pytest
import torch
import torch.nn.functional as F

from dalle_ds import DALLE, DalleConfig, DiscreteVAE, DVAEConfig, pad_text


def tiny(**overrides):
    base = dict(
        text_len=6,
        text_vocab_size=20,
        image_grid=4,
        image_vocab_size=16,
        d_model=32,
        n_layers=5,
        n_heads=4,
        conv_kernel=3,
    )
    return DalleConfig(**{**base, **overrides})


def batch(cfg, b=2):
    text = torch.randint(0, cfg.text_vocab_size, (b, cfg.text_len))
    codes = torch.randint(0, cfg.image_vocab_size, (b, cfg.image_grid, cfg.image_grid))
    return text, codes


def test_pad_text_uses_position_specific_ids():
    cfg = tiny()
    out = pad_text([[3, 4], [1, 2, 3, 4, 5, 6, 7, 8]], cfg)
    assert out.tolist() == [[3, 4, 22, 23, 24, 25], [1, 2, 3, 4, 5, 6]]
    with pytest.raises(ValueError, match=r"outside \[0, 20\)"):
        pad_text([[25]], cfg)


def test_logit_spaces_and_loss_weighting():
    cfg = tiny()
    model = DALLE(cfg)
    text, codes = batch(cfg)
    text[0, 3:] = cfg.text_vocab_size + torch.arange(3, cfg.text_len)  # padded caption
    out = model(text, codes, return_logits=True)
    # Text positions predict text ids (vocab + per-position pads); image positions predict codes.
    assert out.text_logits.shape == (2, cfg.text_len - 1, cfg.text_vocab_size + cfg.text_len)
    assert out.image_logits.shape == (2, cfg.image_len, cfg.image_vocab_size)
    assert out.text_logits.dtype == out.image_logits.dtype == torch.float32
    text_ce = F.cross_entropy(out.text_logits.reshape(-1, out.text_logits.shape[-1]), text[:, 1:].reshape(-1))
    image_ce = F.cross_entropy(out.image_logits.reshape(-1, cfg.image_vocab_size), codes.reshape(-1))
    torch.testing.assert_close(out.text_loss, text_ce)
    torch.testing.assert_close(out.image_loss, image_ce)
    torch.testing.assert_close(out.loss, text_ce / 8 + 7 * image_ce / 8)


@pytest.mark.parametrize("impl", ["block", "dense"])
def test_future_tokens_never_change_earlier_logits(impl):
    cfg = tiny(attention_impl=impl, block_rows=2)
    model = DALLE(cfg).eval()
    text, codes = batch(cfg, 1)
    base = model(text, codes, return_logits=True)
    for p in [0, 5, 9, 15]:  # change image token p: logits predicting tokens <= p must not move
        changed = codes.clone().flatten(1)
        changed[0, p] = (changed[0, p] + 1) % cfg.image_vocab_size
        out = model(text, changed, return_logits=True)
        torch.testing.assert_close(out.text_logits, base.text_logits, atol=0, rtol=0)
        torch.testing.assert_close(out.image_logits[:, : p + 1], base.image_logits[:, : p + 1], atol=0, rtol=0)
        assert not torch.equal(out.image_logits[:, p + 1 :], base.image_logits[:, p + 1 :]) or p == 15
    t = 3  # change text token t: text logits predicting tokens <= t must not move
    changed = text.clone()
    changed[0, t] = (changed[0, t] + 1) % cfg.text_vocab_size
    out = model(changed, codes, return_logits=True)
    torch.testing.assert_close(out.text_logits[:, :t], base.text_logits[:, :t], atol=0, rtol=0)
    assert not torch.equal(out.image_logits, base.image_logits)  # all image tokens see all text


def test_block_and_dense_models_agree_in_value_and_gradient():
    cfg = tiny(attention_impl="block", block_rows=2)  # 'auto' would run this short sequence dense on the CPU
    block = DALLE(cfg)
    dense = DALLE(cfg.replace(attention_impl="dense"))
    dense.load_state_dict(block.state_dict())
    text, codes = batch(cfg)
    lb, ld = block(text, codes).loss, dense(text, codes).loss
    torch.testing.assert_close(lb, ld, atol=1e-5, rtol=1e-5)
    lb.backward()
    ld.backward()
    for (name, pb), pd in zip(block.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pd.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_raw_images_through_frozen_dvae_equal_codes_path():
    vcfg = DVAEConfig(image_size=16, codebook_size=16, n_hid=16, n_init=8, n_blk_per_group=1, group_count=3)
    dvae = DiscreteVAE(vcfg)
    cfg = tiny()
    model = DALLE(cfg, dvae=dvae)
    assert not any(p.requires_grad for p in model.dvae.parameters())
    model.train()
    assert not model.dvae.training
    text, _ = batch(cfg)
    images = torch.rand(2, 3, 16, 16)
    model.eval()
    a = model(text, images=images).loss
    b = model(text, dvae.encode(images)).loss
    torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="dVAE grid 8"):
        DALLE(cfg, dvae=DiscreteVAE(vcfg.replace(group_count=2)))


def test_input_errors_are_clear():
    cfg = tiny()
    model = DALLE(cfg)
    text, codes = batch(cfg)
    with pytest.raises(ValueError, match="exactly one of"):
        model(text)
    with pytest.raises(ValueError, match="needs a dVAE"):
        model(text, images=torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="text_len=6"):
        model(text[:, :4], codes)
    with pytest.raises(ValueError, match=r"image codes must lie in \[0, 16\)"):
        model(text, codes + 16)


def test_tiny_preset_memorises_a_handful_of_pairs():
    torch.manual_seed(0)
    cfg = DalleConfig.from_name("dalle-tiny")
    model = DALLE(cfg)
    text, codes = batch(cfg, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.96), weight_decay=0.0)
    initial = model(text, codes).loss.item()
    for _ in range(150):
        loss = model(text, codes).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 4.0)
        opt.step()
    final = model(text, codes)
    assert initial > 4.0
    assert final.loss.item() < 0.1, final.loss.item()
    assert final.image_loss.item() < 0.1


def test_next_image_logits_on_a_prefix_match_the_full_forward():
    cfg = tiny(block_rows=2)
    model = DALLE(cfg).eval()
    text, codes = batch(cfg)
    full = model(text, codes, return_logits=True).image_logits  # block path, full sequence
    flat = codes.flatten(1)
    for L in [0, 1, 7, 15]:  # prefixes run the dense path on partial sequences
        torch.testing.assert_close(model.next_image_logits(text, flat[:, :L]), full[:, L], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="nothing left to predict"):
        model.next_image_logits(text, flat)


def _sampling_model():
    from dalle_ds import get_preset

    torch.manual_seed(0)
    config = get_preset("dalle-tiny")
    model = DALLE(config).eval()
    # Sharper than an untrained model's near-uniform logits, so top-k / top-p cut real tails.
    with torch.no_grad():
        model.image_emb.weight.mul_(8)
    return config, model, torch.randint(0, config.text_vocab_size, (3, config.text_len))


@pytest.mark.parametrize("kw", [{}, {"top_k": 5}, {"top_p": 0.8, "temperature": 0.7}])
def test_sampling_with_the_kv_cache_equals_sampling_without_it(kw):
    config, model, text = _sampling_model()
    for seed in range(3):
        plain = model.generate(text, generator=torch.Generator().manual_seed(seed), use_cache=False, **kw)
        cached = model.generate(text, generator=torch.Generator().manual_seed(seed), **kw)
        assert cached.shape == (3, config.image_len)
        assert torch.equal(cached, plain)


def test_cached_step_logits_match_the_full_forward():
    from dalle_ds.models.attention import KVCache

    config, model, text = _sampling_model()
    codes = torch.randint(0, config.image_vocab_size, (3, config.image_len))
    caches = [KVCache() for _ in model.blocks]
    h = model.embed(text, codes[:, :0])
    w = model.image_emb.weight
    with torch.no_grad():
        for i in range(config.image_len - 1):
            for block, cache in zip(model.blocks, caches, strict=True):
                h = block(h, cache)
            step = F.linear(model.ln_f(h[:, -1]), w)
            torch.testing.assert_close(step, model.next_image_logits(text, codes[:, :i]), atol=1e-4, rtol=1e-4)
            h = model._image_embed(codes[:, i : i + 1], i)


def test_top_k_and_top_p_restrict_the_support_as_specified():
    from dalle_ds.models.dalle import filter_logits

    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05], [0.05, 0.1, 0.15, 0.2, 0.5]]))
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[True, True, False, False, False], [False, False, False, True, True]]
    # top_p 0.8: the smallest most-likely set reaching 0.8 is {0.5, 0.2, 0.15} (0.85).
    kept = torch.isfinite(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [[True, True, True, False, False], [False, False, True, True, True]]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).sum(-1).tolist() == [1, 1]  # the best always stays
    assert torch.isfinite(filter_logits(logits, top_k=4, top_p=0.6)).sum(-1).tolist() == [2, 2]
    config, model, text = _sampling_model()
    for top_k in (1, 3):  # every drawn token lies in that step's top k
        g = torch.Generator().manual_seed(0)
        codes = model.generate(text, top_k=top_k, generator=g)
        for i in range(config.image_len):
            logits = model.next_image_logits(text, codes[:, :i])
            rank = (logits > logits.gather(1, codes[:, i : i + 1])).sum(-1)
            assert (rank < top_k).all()
    with pytest.raises(ValueError, match="top_p"):
        filter_logits(logits, top_p=0)


def test_primed_rows_are_kept_verbatim_and_condition_the_rest():
    config, model, text = _sampling_model()
    prime = torch.randint(0, config.image_vocab_size, (3, 2 * config.image_grid))  # the top two rows
    out = model.generate(text, prime=prime, generator=torch.Generator().manual_seed(0))
    ref = model.generate(text, prime=prime, generator=torch.Generator().manual_seed(0), use_cache=False)
    assert torch.equal(out[:, : prime.shape[1]], prime) and torch.equal(out, ref)
    shifted = (prime + 1) % config.image_vocab_size
    other = model.generate(text, prime=shifted, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(other[:, prime.shape[1] :], out[:, prime.shape[1] :])
    with pytest.raises(ValueError, match="prime must be"):
        model.generate(text, prime=torch.zeros(3, config.image_len, dtype=torch.long))
