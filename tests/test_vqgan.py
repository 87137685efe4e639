"""The VQGAN against taming-transformers' own modules (the ``taming-transformers`` wheel, installed
for tests with --no-deps): its Encoder, Decoder and VectorQuantizer assembled as ``VQModel.__init__``
does, same random weights, two layouts: identical codes and decoded images within 1e-5. And what the
wheel cannot check (its quantiser predates ``VectorQuantizer2``): the remapped codes and the loss
orders, against taming's documented behaviour."""

import pytest
import torch
import torch.nn as nn

from dalle_ds import VQGANConfig, get_preset
from dalle_ds.models.config import ConfigError
from dalle_ds.models.vqgan import VQGAN

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")

LAYOUTS = {
    # vqgan-tiny: two halvings, attention at 8x8, 128 codes
    "tiny": get_preset("vqgan-tiny"),
    # three halvings, attention at two levels, a wider codebook and a non-square channel ladder
    "f8-two-attn": VQGANConfig(image_size=32, ch=32, ch_mult=(1, 1, 2, 4), num_res_blocks=2,
                               attn_resolutions=(8, 4), z_channels=8, embed_dim=12, n_embed=300),  # fmt: skip
}


class TamingVQModel(nn.Module):
    """taming.models.vqgan.VQModel's modules, without its pytorch_lightning base class."""

    def __init__(self, c: VQGANConfig):
        super().__init__()
        ddconfig = dict(double_z=False, z_channels=c.z_channels, resolution=c.image_size, in_channels=c.channels,
                        out_ch=c.channels, ch=c.ch, ch_mult=list(c.ch_mult), num_res_blocks=c.num_res_blocks,
                        attn_resolutions=list(c.attn_resolutions), dropout=0.0)  # fmt: skip
        self.encoder = taming_model.Encoder(**ddconfig)
        self.decoder = taming_model.Decoder(**ddconfig)
        self.quantize = taming_quantize.VectorQuantizer(c.n_embed, c.embed_dim, beta=0.25)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)


def randomised(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter drawn anew (GroupNorm affine too); the codebook from encoder outputs of random
    images plus noise, so images use many codes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = 0.5 / max(1, p[0].numel()) ** 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale + (1.0 if name.endswith("norm1.weight") else 0.0))
        size = model.encoder.resolution
        z = model.quant_conv(model.encoder(torch.rand(4, 3, size, size, generator=g) * 2 - 1))
        z = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        table = model.quantize.embedding.weight
        picks = torch.randint(0, z.shape[0], (table.shape[0],), generator=g)
        table.copy_(z[picks] + 0.1 * z.std() * torch.randn(table.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_codes_and_decoded_images_equal_tamings(layout):
    c = LAYOUTS[layout]
    theirs = randomised(TamingVQModel(c), seed=1)
    ours = VQGAN(c).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # the same key names, nothing left over
    images = torch.rand(3, 3, c.image_size, c.image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        h = theirs.quant_conv(theirs.encoder(2 * images - 1))
        _, _, (_, _, index) = theirs.quantize(h)
        g = c.grid_size
        want_codes = index.view(3, g, g)
        zq = theirs.quantize.get_codebook_entry(index.flatten(), (3, g, g, c.embed_dim))
        want_images = ((theirs.decoder(theirs.post_quant_conv(zq)) + 1) / 2).clamp(0, 1)
    codes = ours.encode(images)
    assert codes.shape == (3, g, g) and codes.dtype == torch.int64
    assert torch.equal(codes, want_codes)
    assert want_codes.unique().numel() > 4  # the check compares more than one code
    with torch.no_grad():
        torch.testing.assert_close(ours.decode(codes), want_images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("legacy", [True, False])
def test_training_forward_matches_tamings_loss_and_straight_through_gradient(legacy):
    c = get_preset("vqgan-tiny").replace(legacy=legacy)
    theirs = randomised(TamingVQModel(c), seed=3)
    ours = VQGAN(c)
    ours.load_state_dict(theirs.state_dict())
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    out = ours(images)
    h = theirs.quant_conv(theirs.encoder(2 * images - 1))
    zq, loss, (_, _, index) = theirs.quantize(h)  # legacy: mean((e' - z)^2) + beta * mean((e - z')^2)
    if not legacy:  # VectorQuantizer2(legacy=False): beta * mean((e' - z)^2) + mean((e - z')^2)
        e = theirs.quantize.get_codebook_entry(index.flatten(), (2, 8, 8, 16))  # the codes, not straight-through
        loss = 0.25 * ((e.detach() - h) ** 2).mean() + ((e - h.detach()) ** 2).mean()
    recon = theirs.decoder(theirs.post_quant_conv(zq))
    torch.testing.assert_close(out.codebook_loss, loss)
    torch.testing.assert_close(out.recon, recon, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(recon)
    (out.recon * w).sum().add(out.codebook_loss).backward()
    (recon * w).sum().add(loss).backward()
    mine, ref = dict(ours.named_parameters()), dict(theirs.named_parameters())
    for name in ("encoder.conv_in.weight", "quantize.embedding.weight", "decoder.conv_out.weight"):
        torch.testing.assert_close(mine[name].grad, ref[name].grad, atol=1e-5, rtol=1e-4)


def test_remapped_codes_index_the_kept_list_and_unknown_ones_follow_unknown_index():
    """taming's VectorQuantizer2(remap=...): codes are positions in ``used``; a nearest code outside it
    becomes ``unknown_index`` ('extra': one past the list; decoding it reads codebook entry used[0])."""
    base = get_preset("vqgan-tiny")
    used = torch.tensor([5, 9, 2, 40, 77, 3])
    for unknown, expect_vocab in (("extra", 7), (0, 6)):
        c = base.replace(remap_codes=6, unknown_index=unknown)
        assert c.codebook_size == expect_vocab
        model = VQGAN(c).eval()
        model.quantize.used.copy_(used)
        index = torch.tensor([[9, 3, 11], [77, 5, 2]])
        codes = model.quantize.to_codes(index)
        fill = 6 if unknown == "extra" else 0
        assert codes.tolist() == [[1, 5, fill], [4, 0, 2]]
        assert model.quantize.to_index(codes).tolist() == [[9, 3, 5], [77, 5, 2]]  # the filled code reads used[0]
    random = VQGAN(base.replace(remap_codes=6)).quantize
    random.used.copy_(used)
    torch.manual_seed(0)
    assert 0 <= random.to_codes(torch.tensor([11]))[0] < 6


def test_config_errors_name_the_field_and_yaml_round_trips(tmp_path):
    from dalle_ds import load_config, save_config

    with pytest.raises(ConfigError, match=r"VQGANConfig.image_size=18: must be divisible by the downsampling factor 4"):
        VQGANConfig(image_size=18, ch_mult=(1, 2, 2))
    with pytest.raises(ConfigError, match=r"VQGANConfig.ch=48"):
        VQGANConfig(ch=48)
    with pytest.raises(ConfigError, match="unknown_index"):
        VQGANConfig(unknown_index="nearest")
    c = get_preset("vqgan-f16-16384")
    assert (c.grid_size, c.codebook_size, c.downsample) == (16, 16384, 16)
    save_config(c, tmp_path / "vq.yaml")
    assert load_config(tmp_path / "vq.yaml") == c
