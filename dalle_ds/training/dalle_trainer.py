"""The DALL-E transformer trainer: the paper's recipe on the shared loop, with a frozen dVAE
turning images into codes on the engine's device."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..data.synthetic import ALL_COMBOS, SyntheticShapes, caption_of, holdout_combos
from ..distributed import collectives as dd
from ..distributed import ds_adapter
from ..inference.serialization import load_dvae
from ..models.config import DalleConfig
from ..models.dalle import DALLE, check_token_ranges
from ..models.init import materialise, meta_modules
from ..utils.files import atomic_write_text
from ..utils.seeding import derive_seed, numpy_rng
from .construction import engine_placement
from .errors import UsageError
from .optim import adamw_and_schedule, param_groups
from .resume_checks import weights_sha256
from .trainer import Trainer
from .transfer import to_device

__all__ = ["DalleTrainer"]

CAPTIONS = 2  # derive_seed domain of the stream workers' BPE dropout (0: noise, 1: data order)
BPE_DROPOUT = 3  # numpy_rng domain of the synthetic path's BPE dropout
CAPTION_DROPOUT = 4  # numpy_rng domain of caption dropout (classifier-free guidance)


class DalleTrainer(Trainer):
    """The paper's transformer recipe (the defaults of :class:`DalleRunConfig`): AdamW(0.9, 0.96,
    1e-8, wd 4.5e-2, none on gains, biases and embeddings), linear warmup then cosine decay, clipping
    from the JSON (``gradient_clipping``)."""

    model_kind = "dalle"

    def build_model(self):
        if not isinstance(self.config, DalleConfig):
            raise UsageError(f"--preset {self.cfg.preset} is not a DALL-E config")
        self.dvae = load_dvae(self.cfg.dvae)
        self.frozen_inputs["dvae"] = {"path": str(self.cfg.dvae), "sha256": weights_sha256(self.dvae)}
        self.tokenizer = self._tokenizer()
        if self.zero3:
            with ds_adapter.zero3_init(self.ds_config):
                model = DALLE(self.config, initialise=False)
            # zero.Init partitions each module as it is built: initialise one module gathered at a
            # time, so the weights equal those of an unsharded run.
            model.init_weights(
                around=lambda module: ds_adapter.gathered(list(module.parameters(recurse=False)), modifier_rank=0)
            )
            for param in model.external_parameters():  # tied unembeddings are read in DALLE.forward
                ds_adapter.register_external_parameter(model, param)
        else:  # on the meta device, then module by module where and as the engine holds it
            with meta_modules():
                model = DALLE(self.config)
            materialise(model, *engine_placement(self.ds_config))
        # The frozen dVAE stays outside the engine's module: DeepSpeed casts that module to its
        # fp16/bf16 dtype and would shard it under ZeRO-3. It encodes in fp32 on the engine's device
        # (on_engine), so codes do not depend on the training precision.
        model.check_dvae(self.dvae)
        return model

    def on_engine(self) -> None:
        self.dvae.to(device=self.engine.device, dtype=torch.float32)

    def caption_encoder(self):
        from ..data.text import CaptionEncoder

        # Stream batches are tokenized in the data workers, dropout seeded by (seed, rank, the batch's
        # place in its worker's stream); resumed streams repeat both.
        seed = derive_seed(self.cfg.train.seed, CAPTIONS, self.rank)
        return CaptionEncoder(self.tokenizer, self.config, self.cfg.text.bpe_dropout, seed=seed)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels -> (B, grid, grid) codes with the frozen fp32 dVAE (whatever the engine's
        dtype); codes precomputed by scripts/encode_images.py skip this."""
        return self.dvae.encode(images)

    def _tokenizer(self):
        from ..data.text import load_tokenizer, train_tokenizer

        path = self.out / "tokenizer.json"
        if self.cfg.text.tokenizer:
            self.tokenizer_path = Path(self.cfg.text.tokenizer)
            return load_tokenizer(self.cfg.text.tokenizer)
        self.tokenizer_path = path
        if self.rank == 0 and not path.exists():
            data = self.cfg.data
            if data.source == "synthetic":
                captions = [caption_of(c) for c in ALL_COMBOS]
            else:  # a quick one from the stream's first captions; train a real one with train_tokenizer.py
                import itertools

                from ..data import DataConfig, iter_captions

                source = DataConfig(data.source, caption_column=data.caption_column, english_only=data.english_only)
                captions = itertools.islice(iter_captions(source), 100_000)
            train_tokenizer(captions, self.config.text_vocab_size, path)
        dd.barrier()
        return load_tokenizer(path)

    def export(self):
        """``<output>/final`` as a pipeline folder: weights, tokenizer.json and the dVAE in dvae/."""
        final = super().export()
        if self.rank == 0:
            from ..inference.generation import add_pipeline_parts
            from ..inference.hub import write_model_card

            add_pipeline_parts(final, self.tokenizer_path, self.dvae)
            c = self.cfg
            settings = {"name": c.preset, "steps": self.step, "global batch": self.global_batch,
                        "learning rate": c.optimizer.lr, "data": c.data.source, "DeepSpeed config": c.deepspeed_config,
                        "ranks": self.world}  # fmt: skip
            grids = sorted((self.out / "images").glob("samples_*.png"))
            write_model_card(final, settings, sample_grid=grids[-1] if grids else None)
        dd.barrier()
        return final

    def model_blocks(self):
        return self.model.blocks

    def build_optimizer(self, model):
        return adamw_and_schedule(param_groups(model, self.cfg.optimizer.weight_decay), self.cfg, self.ds_config)

    def build_dataset(self):
        # Held-out combinations (zero-shot evaluation) are a fixed function of the count.
        self.holdout = holdout_combos(self.cfg.data.holdout)
        if self.rank == 0:
            atomic_write_text(self.out / "holdout.json", json.dumps([caption_of(c) for c in self.holdout]) + "\n")
        return SyntheticShapes(
            self.cfg.data.synthetic_size, self.dvae.config.image_size, seed=self.cfg.train.seed, exclude=self.holdout
        )

    def image_size(self) -> int:
        return self.dvae.config.image_size

    def write_images(self, step: int) -> None:
        from ..data.text import encode_captions
        from ..utils.images import save_grid

        if self.zero3 or self.rank != 0:
            return  # ZeRO-3: parameters are partitioned; sample from the exported weights instead
        if self.stream is not None:  # captions of the first batch
            captions = list(dict.fromkeys(self.preview["caption"]))[:4] if self.preview else []
        else:
            captions = [caption_of(c) for c in (self.holdout or ALL_COMBOS[:: len(ALL_COMBOS) // 4])[:4]]
        if not captions:
            return
        text = encode_captions(self.tokenizer, captions, self.config).to(self.engine.device)
        module = self.engine.module
        was_training = module.training
        module.eval()
        g = torch.Generator().manual_seed(step)
        codes = module.generate(text.repeat_interleave(4, 0), top_k=8, generator=g)
        module.train(was_training)
        images = self.dvae.decode(codes).float()
        save_grid(images, self.out / "images" / f"samples_{step:08d}.png", nrow=4)
        atomic_write_text(self.out / "images" / f"samples_{step:08d}.txt", "\n".join(captions) + "\n")

    def check_batch(self, batch):
        """A stream's ids and precomputed codes, checked on the host (the forward does not check them,
        which would read device tensors back every micro batch); the synthetic set's captions are
        tokenized in :meth:`compute_loss`, its codes made by the dVAE: valid by construction."""
        check_token_ranges(self.config, batch.get("text"), batch.get("codes"))

    def compute_loss(self, batch):
        from ..data.text import drop_captions, encode_captions

        if "text" in batch:  # a stream's batch, tokenized by its data worker
            text = batch["text"]
        else:  # dropout decisions a pure function of (seed, rank, micro step): resumed runs repeat them
            dropout = self.cfg.text.bpe_dropout
            rng = numpy_rng(self.cfg.train.seed, BPE_DROPOUT, self.rank, self.micro_step) if dropout > 0 else None
            text = encode_captions(self.tokenizer, batch["caption"], self.config, bpe_dropout=dropout, rng=rng)
        text = to_device(text, self.engine.device)
        dropped = 0
        caption_dropout = self.cfg.text.caption_dropout
        if caption_dropout > 0:  # a pure function of (seed, rank, micro step), like BPE dropout
            rng = numpy_rng(self.cfg.train.seed, CAPTION_DROPOUT, self.rank, self.micro_step)
            text, dropped = drop_captions(text, caption_dropout, rng, self.config)
        codes = batch["codes"] if "codes" in batch else self.encode_images(batch["image"])
        out = self.engine(text, image_codes=codes, check_inputs=False)  # checked on the host (check_batch)
        metrics = {"loss": out.loss, "text_loss": out.text_loss, "image_loss": out.image_loss}  # read when logged
        if caption_dropout > 0:  # the share of null captions this step (averaged over ranks when logged)
            metrics["null_caption_share"] = dropped / text.shape[0]
        return out.loss, metrics, text.numel() + text.shape[0] * self.config.image_len
