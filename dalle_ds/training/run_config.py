"""The run config: every training setting of the two trainers in typed dataclasses.

A run is configured from three places, each owning its own settings:

- the model: ``--preset`` (a preset name or a model YAML, :mod:`dalle_ds.models.config`);
- the engine policy: the DeepSpeed JSON (``--deepspeed_config``: ZeRO stage, precision, offload,
  activation checkpointing, gradient clipping, monitors, and the two sections dalle-ds reads itself,
  ``communication_hook`` and ``per_resblock_grad_scaling``);
- everything else, here: data, batch, optimizer, schedule, checkpoints, logging and each trainer's
  recipe, as the fields of :class:`DalleRunConfig` / :class:`DVAERunConfig`.

The fields' defaults are the paper's recipe. A run YAML (``--config run.yaml``) holds any subset,
by section (``optimizer: {lr: 3.0e-4}``); command-line flags are generated from the fields (one per
field, e.g. ``--lr`` for ``optimizer.lr``), with the help text written beside each field.
Precedence: flag > YAML > default. A setting the DeepSpeed JSON would also give (the batch keys, an
``optimizer`` or ``scheduler`` section) is an error naming both places.

:mod:`.run_args` turns flags and a YAML into a run config; ``python -m
dalle_ds.training.config_reference`` prints the reference table of every field
(``docs/configuration.md``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..inference.serialization import shard_size
from .errors import UsageError

__all__ = [
    "CheckpointSettings",
    "DVAERunConfig",
    "DVAESettings",
    "DalleRunConfig",
    "DataSettings",
    "LoggingSettings",
    "OptimizerSettings",
    "RunConfig",
    "RunConfigError",
    "ScheduleSettings",
    "TextSettings",
    "TrainSettings",
    "VQGANRunConfig",
    "VQGANSettings",
]


class RunConfigError(UsageError):
    """A run setting is missing, unknown or invalid; the message names the key (and file)."""


def setting(default: Any, help: str, *, flag: str | None = None, choices=None, required: bool = False):
    """A run-config field: its default, its help text, and its command-line flag (default
    ``--field-name``). ``required``: no default; a flag or the YAML must give it."""
    metadata = {"help": help, "flag": flag, "choices": choices, "required": required}
    if isinstance(default, (list, tuple, dict)):
        return field(default_factory=lambda: default, metadata=metadata)
    return field(default=default, metadata=metadata)


def section(cls, help: str, **defaults):
    """A section field: ``cls`` with trainer-specific ``defaults``."""
    return field(default_factory=functools.partial(cls, **defaults), metadata={"help": help, "section": True})


# --- sections --------------------------------------------------------------------------------------
@dataclass
class DataSettings:
    source: str = setting(
        "synthetic",
        "'synthetic' (the captioned-shapes set made on the fly), or a stream: WebDataset tar or Parquet shards "
        "(a folder or glob), an image folder with metadata.jsonl, or a hub dataset id",
        flag="--data",
    )
    image_column: str | None = setting(None, "stream: the image column or tar member type (default: detected)")
    caption_column: str | None = setting(None, "stream: the caption column or tar member type (default: detected)")
    workers: int = setting(2, "stream: data-loader worker processes per rank (0: read in the training process)",
                           flag="--data-workers")  # fmt: skip
    shuffle_buffer: int = setting(1000, "stream: examples shuffled together within each shard, per worker")
    english_only: bool = setting(
        False, "stream: skip captions the language detector does not find English (counted as non_english)"
    )
    synthetic_size: int = setting(4096, "synthetic: samples per epoch", flag="--data-size")
    holdout: int = setting(0, "synthetic: shape/colour/position combinations held out of training")

    def __post_init__(self):
        _check(self.workers >= 0, "data.workers", self.workers, "must be >= 0")
        _check(self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer, "must be >= 1")
        _check(self.synthetic_size >= 1, "data.synthetic_size", self.synthetic_size, "must be >= 1")
        _check(self.holdout >= 0, "data.holdout", self.holdout, "must be >= 0")


@dataclass
class TrainSettings:
    steps: int | None = setting(None, "optimizer steps to train in all (a resumed run continues up to it)",
                                required=True)  # fmt: skip
    micro_batch_size: int | None = setting(
        None, "per-rank micro batch (default: the DeepSpeed JSON's train_micro_batch_size_per_gpu)"
    )
    grad_accum: int | None = setting(
        None, "micro batches per optimizer step (default: the JSON's gradient_accumulation_steps, or derived "
        "from its train_batch_size)"
    )  # fmt: skip
    seed: int = setting(0, "seed of the initial weights, the data order and every rank's noise streams")
    max_bad_steps: int = setting(5, "stop (after saving) when the loss is non-finite this many steps in a row")
    compile: bool = setting(
        False, "torch.compile each transformer block, compiled in the first two steps (the dVAE has none: refused)"
    )

    def __post_init__(self):
        _check(self.steps is None or self.steps >= 1, "train.steps", self.steps, "must be >= 1")
        for key in ("micro_batch_size", "grad_accum"):
            value = getattr(self, key)
            _check(value is None or value >= 1, f"train.{key}", value, "must be >= 1")
        _check(self.max_bad_steps >= 1, "train.max_bad_steps", self.max_bad_steps, "must be >= 1")


@dataclass
class OptimizerSettings:
    lr: float = setting(4.5e-4, "peak learning rate of AdamW")
    betas: tuple[float, float] = setting((0.9, 0.96), "AdamW's beta1 beta2")
    eps: float = setting(1e-8, "AdamW's epsilon", flag="--adam-eps")
    weight_decay: float = setting(4.5e-2, "AdamW's decoupled weight decay (none on gains, biases and embeddings)")

    def __post_init__(self):
        self.betas = tuple(self.betas)
        _check(self.lr > 0, "optimizer.lr", self.lr, "must be > 0")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "optimizer.betas", self.betas,
               "must be two numbers in [0, 1)")  # fmt: skip
        _check(self.eps > 0, "optimizer.eps", self.eps, "must be > 0")
        _check(self.weight_decay >= 0, "optimizer.weight_decay", self.weight_decay, "must be >= 0")


@dataclass
class ScheduleSettings:
    warmup_steps: int | None = setting(None, "linear warm-up steps (default: 1/20 of train.steps, at least 1)")
    lr_end: float | None = setting(
        None, "learning rate at the end of the cosine decay that follows warm-up (default: 10% of optimizer.lr)"
    )

    def __post_init__(self):
        _check(self.warmup_steps is None or self.warmup_steps >= 0, "schedule.warmup_steps", self.warmup_steps,
               "must be >= 0")  # fmt: skip
        _check(self.lr_end is None or self.lr_end >= 0, "schedule.lr_end", self.lr_end, "must be >= 0")


@dataclass
class CheckpointSettings:
    save_every: int = setting(0, "checkpoint every N steps (0: at the end only)")
    keep: int = setting(2, "complete checkpoints to keep (older ones are deleted)", flag="--keep-checkpoints")
    export_shard_size: str = setting(
        "5GB", "<output>/final: weights over this size are written as safetensors shards + index (Hugging Face "
        "layout; 'none': one file)"
    )  # fmt: skip
    resume: bool = setting(False, "continue from the latest complete checkpoint in <output>/checkpoints")

    def __post_init__(self):
        _check(self.save_every >= 0, "checkpoint.save_every", self.save_every, "must be >= 0")
        _check(self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1")
        try:
            shard_size(self.export_shard_size)
        except ValueError as err:
            raise RunConfigError(f"checkpoint.export_shard_size: {err}") from None

    @property
    def export_shard_bytes(self) -> int | None:
        return shard_size(self.export_shard_size)


@dataclass
class LoggingSettings:
    log_every: int = setting(1, "write a metrics.jsonl record every N steps")
    image_every: int = setting(0, "write a PNG grid (samples or reconstructions) every N steps (0: at the end)")
    progress: bool = setting(True, "a tqdm progress bar on rank 0 (--no-progress: none)")
    check_sync: bool = setting(False, "at the end, check every rank holds identical parameters (hashes them all)")

    def __post_init__(self):
        _check(self.log_every >= 1, "logging.log_every", self.log_every, "must be >= 1")
        _check(self.image_every >= 0, "logging.image_every", self.image_every, "must be >= 0")


@dataclass
class TextSettings:
    tokenizer: str | None = setting(
        None, "a tokenizer.json (default: train one on the synthetic captions or the stream's first 100k)"
    )
    bpe_dropout: float = setting(0.1, "BPE dropout while training (seeded by seed, rank and batch: resumable)")
    caption_dropout: float = setting(
        0.0, "share of captions replaced by the null caption, so that sampling can use classifier-free guidance "
        "(generate.py --cond-scale)"
    )  # fmt: skip

    def __post_init__(self):
        _check(0 <= self.bpe_dropout <= 1, "text.bpe_dropout", self.bpe_dropout, "must be in [0, 1]")
        _check(0 <= self.caption_dropout <= 1, "text.caption_dropout", self.caption_dropout, "must be in [0, 1]")


@dataclass
class DVAESettings:
    temperature_start: float = setting(1.0, "gumbel-softmax temperature at step 0")
    temperature_end: float = setting(1 / 16, "gumbel-softmax temperature at the end of its cosine anneal")
    temperature_steps: int = setting(0, "length of the temperature anneal (0: the whole run)")
    kl_weight: float = setting(6.6, "KL weight reached at the end of its cosine warm-up")
    kl_steps: int = setting(0, "length of the KL warm-up (0: 1/30 of train.steps)")
    commitment: float = setting(0.25, "vq quantizer: weight of the commitment loss")
    recon_loss: str = setting(
        "logit_laplace", "reconstruction term: the paper's logit-Laplace NLL, or mse (small images of flat shapes)",
        choices=("logit_laplace", "mse"),
    )  # fmt: skip
    ema: bool = setting(False, "keep an EMA of the weights (exported as <output>/final_ema)")
    ema_decay: float = setting(0.999, "decay of the weights' EMA")

    def __post_init__(self):
        _check(self.recon_loss in ("logit_laplace", "mse"), "dvae.recon_loss", self.recon_loss,
               "must be logit_laplace or mse")  # fmt: skip
        _check(0 < self.ema_decay < 1, "dvae.ema_decay", self.ema_decay, "must be in (0, 1)")


@dataclass
class VQGANSettings:
    disc_start: int = setting(-1, "step at which the discriminator's losses switch on (-1: half of train.steps)")
    disc_weight: float = setting(0.8, "weight of the generator's adversarial term (times the adaptive weight)")
    disc_factor: float = setting(1.0, "factor on both adversarial losses once the discriminator is on")
    disc_loss: str = setting("hinge", "the discriminator's loss", choices=("hinge", "vanilla"))
    disc_layers: int = setting(3, "the patch discriminator's strided conv layers")
    disc_ndf: int = setting(64, "the patch discriminator's base width")
    codebook_weight: float = setting(1.0, "weight of the codebook + commitment loss")
    pixel_weight: float = setting(1.0, "weight of the L1 pixel loss")
    perceptual_weights: str | None = setting(
        None, "LPIPS weights: a local safetensors / .pth of its state dict or a taming checkpoint (none: no "
        "perceptual loss)",
    )  # fmt: skip
    perceptual_weight: float = setting(1.0, "weight of the LPIPS loss (with perceptual_weights)")
    init_from: str | None = setting(None, "start from this VQGAN folder's weights (fine-tuning; --preset must match)")

    def __post_init__(self):
        _check(self.disc_loss in ("hinge", "vanilla"), "vqgan.disc_loss", self.disc_loss, "must be hinge or vanilla")
        _check(self.disc_start >= -1, "vqgan.disc_start", self.disc_start, "must be >= 0 (or -1: half the run)")
        _check(self.disc_layers >= 1, "vqgan.disc_layers", self.disc_layers, "must be >= 1")


# --- the run configs -------------------------------------------------------------------------------
@dataclass
class _RunConfig:
    preset: str | None = setting(None, "model preset name or model YAML (see docs/models.md)", required=True)
    deepspeed_config: str | None = setting(
        None, "the DeepSpeed JSON: engine policy (ds_configs/)", flag="--deepspeed_config", required=True
    )
    output_dir: str | None = setting(None, "the run's folder: checkpoints, metrics, final export", required=True)

    trainer = ""

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def prepared_ds_config(self, raw: dict[str, Any], world_size: int, grad_accum: int | None = None) -> dict[str, Any]:
        """The DeepSpeed JSON ``raw`` with its batch keys filled from this run's settings on
        ``world_size`` ranks (a conflict names both sources) and enabled monitors writing under
        ``<output>/monitor`` unless the JSON says where. ``grad_accum`` replaces the run's and the
        JSON's gradient accumulation and global batch (a resume on another number of ranks)."""
        from ..distributed.ds_config import prepare_ds_config

        if grad_accum is not None:
            raw = {k: v for k, v in raw.items() if k not in ("train_batch_size", "gradient_accumulation_steps")}
        prepared = prepare_ds_config(
            raw,
            world_size=world_size,
            micro_batch_size=self.train.micro_batch_size,
            gradient_accumulation_steps=grad_accum or self.train.grad_accum,
            source=str(self.deepspeed_config),
            given_as={
                "train_micro_batch_size_per_gpu": "train.micro_batch_size (--micro-batch-size)",
                "gradient_accumulation_steps": "train.grad_accum (--grad-accum)",
            },
        )
        for monitor in ("csv_monitor", "tensorboard"):
            section = prepared.get(monitor)
            if isinstance(section, dict) and section.get("enabled") and not section.get("output_path"):
                section["output_path"] = str(Path(self.output_dir) / "monitor")
        return prepared


@dataclass
class DalleRunConfig(_RunConfig):
    """Every setting of the DALL-E transformer trainer (``scripts/train_dalle.py``)."""

    dvae: str | None = setting(None, "the trained dVAE folder that turns images into codes", required=True)
    data: DataSettings = section(DataSettings, "what to train on")
    train: TrainSettings = section(TrainSettings, "steps, batch and seed")
    optimizer: OptimizerSettings = section(OptimizerSettings, "AdamW (paper: 0.9, 0.96, 1e-8, wd 4.5e-2)")
    schedule: ScheduleSettings = section(ScheduleSettings, "linear warm-up, then cosine decay")
    checkpoint: CheckpointSettings = section(CheckpointSettings, "checkpoints, resume and export")
    logging: LoggingSettings = section(LoggingSettings, "metrics, images, progress")
    text: TextSettings = section(TextSettings, "captions: tokenizer and dropouts")

    trainer = "dalle"


@dataclass
class DVAERunConfig(_RunConfig):
    """Every setting of the dVAE trainer (``scripts/train_dvae.py``)."""

    data: DataSettings = section(DataSettings, "what to train on")
    train: TrainSettings = section(TrainSettings, "steps, batch and seed")
    optimizer: OptimizerSettings = section(
        OptimizerSettings, "AdamW (paper: 0.9, 0.999, 1e-8, wd 1e-4)", lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4
    )
    schedule: ScheduleSettings = section(ScheduleSettings, "cosine decay (no warm-up by default)", warmup_steps=0,
                                         lr_end=1.25e-6)  # fmt: skip
    checkpoint: CheckpointSettings = section(CheckpointSettings, "checkpoints, resume and export")
    logging: LoggingSettings = section(LoggingSettings, "metrics, images, progress")
    dvae: DVAESettings = section(DVAESettings, "the dVAE recipe: relaxation, KL, reconstruction, EMA")

    trainer = "dvae"


@dataclass
class VQGANRunConfig(_RunConfig):
    """Every setting of the VQGAN trainer (``scripts/train_vqgan.py``)."""

    data: DataSettings = section(DataSettings, "what to train on")
    train: TrainSettings = section(TrainSettings, "steps, batch and seed")
    optimizer: OptimizerSettings = section(
        OptimizerSettings, "Adam for the generator and the discriminator (taming: 0.5, 0.9, no decay)", lr=1e-4,
        betas=(0.5, 0.9), weight_decay=0.0,
    )  # fmt: skip
    schedule: ScheduleSettings = section(ScheduleSettings, "cosine decay, no warm-up (taming: constant)",
                                         warmup_steps=0)  # fmt: skip
    checkpoint: CheckpointSettings = section(CheckpointSettings, "checkpoints, resume and export")
    logging: LoggingSettings = section(LoggingSettings, "metrics, images, progress")
    vqgan: VQGANSettings = section(VQGANSettings, "the VQGAN recipe: L1, LPIPS, codebook, patch GAN")

    trainer = "vqgan"


RunConfig = DalleRunConfig | DVAERunConfig | VQGANRunConfig


# --- helpers ---------------------------------------------------------------------------------------
def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise RunConfigError(f"{key}={value!r}: {why}")


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
