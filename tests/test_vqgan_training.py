"""Training a VQGAN (dalle_ds/models/vqgan_loss.py, dalle_ds/training/vqgan_trainer.py): the patch
discriminator against taming's, the step's loss and where its gradients go (generator vs
discriminator, the adaptive weight), LPIPS weights loaded from a local file, and the trainer on two
ranks under DeepSpeed: the discriminator switched on at its step, exact resume, the export holding the
VQGAN alone; the refusals; and (slow) reconstruction improving with codebook use above a floor."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from launching import ds_config, launch, metrics, resume_copy
from safetensors.torch import load_file, save_file

from dalle_ds import VQGAN, get_preset, load_model, save_config, save_model
from dalle_ds.inference.serialization import UnsafeCheckpointError
from dalle_ds.inference.taming import load_lpips
from dalle_ds.models.vqgan_loss import LPIPS, PatchDiscriminator, VQGANTrainingModel, adaptive_weight, hinge_d_loss

CONFIG = get_preset("vqgan-tiny")


def test_the_patch_discriminator_is_tamings():
    taming_disc = pytest.importorskip("taming.modules.discriminator.model")
    torch.manual_seed(0)
    theirs = taming_disc.NLayerDiscriminator(input_nc=3, ndf=16, n_layers=3).train()
    ours = PatchDiscriminator(3, 16, 3).train()
    running = ("running_mean", "running_var", "num_batches_tracked")
    state = {k: v for k, v in theirs.state_dict().items() if not k.endswith(running)}
    ours.load_state_dict(state, strict=True)  # the same keys, less BatchNorm's running averages
    x = torch.randn(4, 3, 32, 32)
    torch.testing.assert_close(ours(x), theirs(x))  # training mode: batch statistics both


def test_the_steps_loss_sends_each_term_to_its_network():
    """Generator: L1 + adaptive weight x adversarial term + codebook loss; discriminator: its hinge
    loss on the images and the detached reconstructions; nothing else reaches either."""
    torch.manual_seed(1)
    model = VQGANTrainingModel(CONFIG, disc_layers=2, disc_ndf=16)
    images = torch.rand(4, 3, 32, 32)
    loss, _ = model(images, disc_factor=0.7, disc_weight=0.8, codebook_weight=1.5)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = copy.deepcopy(model)
    ref.zero_grad()
    x = 2 * images - 1
    zq, qloss, _ = ref.quantize(ref.quant_conv(ref.encoder(x)))
    recon = ref.decoder(ref.post_quant_conv(zq))
    nll = (x - recon).abs().mean()
    frozen = copy.deepcopy(ref.loss.discriminator).requires_grad_(False)
    g_loss = -frozen(recon).mean()
    nll_g = torch.autograd.grad(nll, ref.decoder.conv_out.weight, retain_graph=True)[0]
    g_g = torch.autograd.grad(g_loss, ref.decoder.conv_out.weight, retain_graph=True)[0]
    d_weight = (nll_g.norm() / (g_g.norm() + 1e-4)).clamp(0, 1e4) * 0.8
    assert torch.equal(adaptive_weight(nll, g_loss, ref.decoder.conv_out.weight) * 0.8, d_weight.detach())
    disc = ref.loss.discriminator
    d_loss = 0.7 * 0.5 * (F.relu(1 - disc(x)).mean() + F.relu(1 + disc(recon.detach())).mean())
    (nll + d_weight.detach() * 0.7 * g_loss + 1.5 * qloss + d_loss).backward()
    for name, p in ref.named_parameters():
        torch.testing.assert_close(got[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
    assert all(got[n].abs().sum() > 0 for n in got if n.startswith("loss.discriminator.") and "weight" in n)
    assert hinge_d_loss(torch.full((2,), 2.0), torch.full((2,), -2.0)) == 0  # both sides past the margin


def test_before_the_discriminator_starts_only_reconstruction_and_codebook_train():
    torch.manual_seed(2)
    model = VQGANTrainingModel(CONFIG, disc_layers=2, disc_ndf=16)
    loss, metrics = model(torch.rand(2, 3, 32, 32), disc_factor=0.0)
    loss.backward()
    assert metrics["d_loss"] == 0 and metrics["g_loss"] == 0 and metrics["d_weight"] == 0
    disc_grads = [p.grad for n, p in model.named_parameters() if n.startswith("loss.")]
    assert all(g is not None and not g.any() for g in disc_grads)  # present (every rank reduces them), zero
    torch.testing.assert_close(loss, metrics["rec_loss"] + metrics["codebook_loss"])


def random_lpips_state(seed=3) -> dict:
    torch.manual_seed(seed)
    net = LPIPS()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05).abs_() if p.shape[0] == 1 else p.normal_(0, 0.05)  # lin weights: positive, as LPIPS's
    return net.state_dict()


def test_lpips_loads_from_a_local_file_or_a_taming_checkpoint_and_is_a_distance(tmp_path):
    state = random_lpips_state()
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "lpips.safetensors")
    net = load_lpips(tmp_path / "lpips.safetensors")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())
    a, b = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    assert net(a, a).abs().max() < 1e-6 and (net(a, b) > 0).all() and net(a, b).shape == (2, 1, 1, 1)
    b.requires_grad_(True)
    net(a, b).sum().backward()
    assert b.grad.abs().sum() > 0 and not any(p.requires_grad for p in net.parameters())
    # A taming checkpoint holds them under loss.perceptual_loss. (read without running code)
    torch.save({"state_dict": {f"loss.perceptual_loss.{k}": v for k, v in state.items()}}, tmp_path / "last.ckpt")
    from_ckpt = load_lpips(tmp_path / "last.ckpt")
    assert all(torch.equal(from_ckpt.state_dict()[k], v) for k, v in state.items())
    partial = {k: v.contiguous() for k, v in state.items() if not k.startswith("lin4")}
    save_file(partial, tmp_path / "partial.safetensors")
    with pytest.raises(ValueError, match=r"partial.safetensors: missing \['lin4.model.1.weight'\]"):
        load_lpips(tmp_path / "partial.safetensors")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_lpips(tmp_path / "nope.pth")
    torch.save({"x": Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="could run code"):
        load_lpips(tmp_path / "evil.pth")


class Exploit:
    def __reduce__(self):
        import os

        return os.system, ("true",)


def vqgan_args(out, cfg, *extra):
    return ["--deepspeed_config", cfg, "--preset", "vqgan-tiny", "--output-dir", out, "--steps", 6,
            "--micro-batch-size", 2, "--save-every", 2, "--log-every", 1, "--disc-start", 2, "--lr", 1e-3,
            "--data-size", 48, "--no-progress", *extra]  # fmt: skip


@pytest.mark.parametrize("quantizer", ["learned", "ema"])
def test_two_ranks_train_switch_the_discriminator_on_resume_exactly_and_export_the_vqgan(tmp_path, quantizer):
    """``ema``: the codebook statistics are summed over ranks and restarts drawn on rank 0, so the ranks
    keep one codebook (--check-sync hashes parameters and buffers on every rank)."""
    cfg = ds_config(tmp_path, 2)
    config = CONFIG.replace(quantizer=quantizer)
    save_config(config, tmp_path / "vqgan.yaml")
    ref = tmp_path / "ref"

    def vqgan_args(out, cfg):
        args = globals()["vqgan_args"](out, cfg, "--check-sync")
        args[args.index("--preset") + 1] = tmp_path / "vqgan.yaml"
        return args

    proc = launch("train_vqgan.py", *vqgan_args(ref, cfg))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = metrics(ref)
    assert [r["disc_factor"] for r in rows] == [0, 0, 1, 1, 1, 1]  # --disc-start 2: on from the third step
    assert all(r["d_loss"] == 0 for r in rows[:2]) and all(r["d_loss"] > 0 and r["d_weight"] > 0 for r in rows[2:])
    assert all(math.isfinite(r["loss"]) for r in rows) and all(0 < r["codebook_usage"] <= 1 for r in rows)
    # Resumed from step 4 (a copy of the run cut there): the same losses and the same final weights.
    out = tmp_path / "resumed"
    resume_copy("train_vqgan.py", vqgan_args(out, cfg), ref)
    for key in ("loss", "d_loss", "g_loss", "rec_loss"):
        torch.testing.assert_close(torch.tensor([r[key] for r in metrics(out)]),
                                   torch.tensor([r[key] for r in rows]), rtol=1e-6, atol=1e-6)  # fmt: skip
    a, b = load_file(ref / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("loss.") for k in a)  # the discriminator stays behind
    model = load_model(ref / "final")
    assert type(model) is VQGAN and model.config == config
    assert "parameters identical on all 2 ranks" in proc.stdout
    assert json.loads((ref / "final" / "config.json").read_text())["model_type"] == "vqgan"


def test_bf16_with_lpips_and_init_from_a_vqgan_folder(tmp_path, single_process_group):
    from dalle_ds.training import VQGANRunConfig, VQGANTrainer, parse_run_config

    torch.manual_seed(4)
    start = save_model(VQGAN(CONFIG), tmp_path / "start")
    save_file({k: v.contiguous() for k, v in random_lpips_state().items()}, tmp_path / "lpips.safetensors")
    cfg = tmp_path / "bf16.json"
    base = json.loads(ds_config(tmp_path, 2).read_text())
    cfg.write_text(json.dumps({**base, "bf16": {"enabled": True}}))
    args = vqgan_args(tmp_path / "run", cfg, "--init-from", start, "--perceptual-weights",
                      tmp_path / "lpips.safetensors")  # fmt: skip
    args[args.index("--steps") + 1] = 3
    trainer = VQGANTrainer(parse_run_config(VQGANRunConfig, [str(a) for a in args]))
    module = trainer.engine.module
    assert module.encoder.conv_in.weight.dtype == torch.bfloat16
    torch.testing.assert_close(module.encoder.conv_in.weight.float(),
                               load_model(start).encoder.conv_in.weight.bfloat16().float())  # fmt: skip
    trainer.run()
    rows = metrics(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in rows) and all(r["p_loss"] > 0 for r in rows)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"stage": 3}, "ZeRO stage 3 partitions the weights"),
        ({"preset": "dvae-tiny"}, "--preset dvae-tiny is not a VQGAN config"),
        ({"init_from": "other"}, r"does not match --preset vqgan-tiny: \{'n_embed': 64\}"),
    ],
)
def test_what_the_trainer_refuses_it_names(tmp_path, single_process_group, change, message):
    from dalle_ds.training import UsageError, VQGANRunConfig, VQGANTrainer, parse_run_config

    save_model(VQGAN(CONFIG.replace(n_embed=64)), tmp_path / "other")
    args = vqgan_args(tmp_path / "run", ds_config(tmp_path, change.get("stage", 2)))
    if "preset" in change:
        args[args.index("--preset") + 1] = change["preset"]
    if "init_from" in change:
        args += ["--init-from", tmp_path / "other"]
    with pytest.raises(UsageError, match=message):
        VQGANTrainer(parse_run_config(VQGANRunConfig, [str(a) for a in args]))


@pytest.mark.slow
def test_reconstruction_improves_and_the_codebook_stays_in_use(tmp_path):
    """400 steps of vqgan-tiny with the EMA codebook on the synthetic shapes (2 ranks, fp32 ZeRO-2,
    discriminator from step 200): reconstruction PSNR on held-out images rises well above the
    untrained model's and half of the codebook or more is in use (measured: 6.3 -> 20.8 dB, all 128
    codes; taming's learned codebook reached 17.6 dB on 15% of them)."""
    from dalle_ds.data.synthetic import SyntheticShapes
    from dalle_ds.inference.evaluation import dvae_metrics

    out = tmp_path / "vqgan"
    save_config(CONFIG.replace(quantizer="ema"), tmp_path / "vqgan.yaml")
    args = vqgan_args(out, ds_config(tmp_path, 2), "--micro-batch-size", 8, "--data-size", 4000, "--lr", 3e-4,
                      "--log-every", 50)  # fmt: skip
    changes = (("--steps", 400), ("--disc-start", 200), ("--save-every", 0), ("--preset", tmp_path / "vqgan.yaml"))
    for flag, value in changes:
        args[args.index(flag) + 1] = value
    proc = launch("train_vqgan.py", *args, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    held_out = SyntheticShapes(64, 32, seed=12345)
    images = torch.stack([held_out[i]["image"] for i in range(64)])
    torch.manual_seed(0)
    before = dvae_metrics(VQGAN(CONFIG).eval(), [images])
    after = dvae_metrics(load_model(out / "final"), [images])
    print(f"PSNR {before['psnr']:.2f} -> {after['psnr']:.2f} dB, codebook usage {after['usage']:.2f}")
    assert after["psnr"] > before["psnr"] + 8 and after["usage"] >= 0.5
