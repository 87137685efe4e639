"""Per res block, how far a run's fp16 gradients are from an fp32 reference: cosine, flushed
entries and the norm they carried, overflowed entries (``compare``, ``SegStat``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dalle_ds import DALLE, DalleConfig

__all__ = [
    "GOAL_COS",
    "NonFiniteProbe",
    "SegStat",
    "blocks_only",
    "compare",
    "load_weights",
    "reference_grads",
    "segment_of",
    "segment_order",
    "usable",
]

GOAL_COS = 0.999


def segment_of(name: str) -> str:
    """The res block (scaler segment) a parameter belongs to, as install_resblock_scaling names them."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return f"blocks.{parts[1]}.{'attn' if parts[2] in ('ln_1', 'attn') else 'mlp'}"
    return "rest"


def segment_order(config: DalleConfig) -> list[str]:
    return [f"blocks.{i}.{b}" for i in range(config.n_layers) for b in ("attn", "mlp")] + ["rest"]


@dataclass
class SegStat:
    cos: float
    flush: float  # share of reference-nonzero entries that are exactly zero in the run
    flush_mass: float  # |reference over those entries| / |reference|
    overflow: float  # share of non-finite entries
    norm_ratio: float  # |run| / |reference|


def compare(
    run: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], nonfinite: dict[str, torch.Tensor]
) -> dict[str, SegStat]:
    """Per segment: ``run`` (unscaled fp32 gradients, maybe non-finite), ``ref`` (fp32 reference),
    ``nonfinite`` (extra per-parameter masks of entries that were non-finite before a filter)."""
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
    for name, r in ref.items():
        g = run[name].float()
        bad = ~torch.isfinite(g)
        if name in nonfinite:
            bad |= nonfinite[name]
        parts.setdefault(segment_of(name), []).append((torch.where(bad, 0.0, g).flatten(), r.flatten(), bad.flatten()))
    out = {}
    for seg, items in parts.items():
        g = torch.cat([i[0] for i in items]).double()
        r = torch.cat([i[1] for i in items]).double()
        bad = torch.cat([i[2] for i in items])
        nz = r != 0
        flushed = nz & (g == 0) & ~bad
        rn, gn = r.norm().item(), g.norm().item()
        out[seg] = SegStat(
            # not F.cosine_similarity: its eps (1e-8) clamps the norms, and at --loss-mult 1e-8 they are smaller
            cos=(g @ r).item() / (gn * rn) if rn > 0 and gn > 0 else (float("nan") if rn == 0 else 0.0),
            flush=flushed.sum().item() / max(1, nz.sum().item()),
            flush_mass=r[flushed].norm().item() / rn if rn > 0 else 0.0,
            overflow=bad.sum().item() / bad.numel(),
            norm_ratio=gn / rn if rn > 0 else float("nan"),
        )
    return out


def load_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(weights[name].to(p.dtype))


def reference_grads(
    ref_model: DALLE, weights: dict[str, torch.Tensor], batch, loss_mult: float
) -> dict[str, torch.Tensor]:
    """fp32 gradients of ``loss * loss_mult`` at ``weights`` (cast to fp32) on ``batch``."""
    load_weights(ref_model, weights)
    ref_model.zero_grad(set_to_none=True)
    (ref_model(*batch).loss * loss_mult).backward()
    return {
        n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
        for n, p in ref_model.named_parameters()
    }


class NonFiniteProbe:
    """Tensor hooks registered BEFORE the scaler's (hooks run in registration order): they see the raw,
    scaled gradient and record which entries are non-finite, which the scaler then zeroes."""

    def __init__(self, model: torch.nn.Module):
        self.armed = False
        self.masks: dict[str, torch.Tensor] = {}
        for name, p in model.named_parameters():
            p.register_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(grad: torch.Tensor) -> None:
            if self.armed:
                bad = ~torch.isfinite(grad)
                self.masks[name] = self.masks[name] | bad if name in self.masks else bad

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        masks, self.masks = self.masks, {}
        return masks


def blocks_only(stats: dict[str, SegStat]) -> dict[str, SegStat]:
    return {s: v for s, v in stats.items() if s != "rest"}


def usable(stats: dict[str, SegStat], whole: bool) -> bool:
    """Every block cos >= GOAL_COS and no overflow (whole: anywhere, incl. rest, as one scale skips the step)."""
    segs = stats if whole else blocks_only(stats)
    return all(s.cos >= GOAL_COS and s.overflow == 0 for s in segs.values())
