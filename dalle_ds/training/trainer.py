"""The training loop shared by the dVAE and DALL-E trainers, on a DeepSpeed engine.

Launched with the plain DeepSpeed launcher (``deepspeed [--hostfile H] scripts/train_dalle.py
--deepspeed_config ds_configs/... --preset ...``). The engine policy comes from the JSON; the
trainer owns the model, the paper's optimiser and schedules, the data order, checkpoints and logs.

:meth:`Trainer.run` reads top to bottom: set up (process group, config, model, engine, data,
resume), then per optimizer step :meth:`Trainer.train_step` (micro batches, backward, step),
:meth:`Trainer.after_update` (communication-hook bookkeeping, the subclass's hook), at logged steps
:meth:`Trainer.log_step` (the metrics record, the non-finite guard), the preemption check
(``preemption``: save and stop when a rank was signalled), and periodic checkpoints and images;
then :meth:`Trainer.finish` (final checkpoint, export, sync check, data counts). Losses and the
non-finite counter stay on the device between logged steps: no host sync per micro batch.
Subclasses (``dvae_trainer``, ``dalle_trainer``) supply the model, optimizer, data set and loss.
"""

from __future__ import annotations

import abc
import contextlib
import json
import random
from pathlib import Path
from typing import Any

import torch
import yaml

from ..data.order import EpochOrder
from ..distributed import collectives as dd
from ..distributed import ds_adapter
from ..distributed.ds_config import load_ds_config, zero_stage
from ..distributed.powersgd import build_comm_hook
from ..distributed.process_group import init_distributed
from ..models.config import load_config, save_config
from ..utils.files import atomic_write_text
from ..utils.images import as_float_image
from ..utils.seeding import derive_seed
from . import reshard
from .checkpointing import Checkpointer, export_checkpoint
from .compile_blocks import wrap_blocks
from .errors import TrainingStopped, UsageError
from .faults import Faults
from .grad_scaling import ResblockGradScaler, ResblockScalingConfig, install_resblock_scaling, skipping_step
from .metrics import MetricsLog, NonFiniteRun, check_ranks_identical, sum_over_ranks
from .preemption import stop_if_signalled
from .resume_checks import fit_check
from .run_args import resume_changes
from .run_config import RunConfig
from .transfer import batch_to_device

__all__ = ["Trainer"]

NOISE = 0  # derive_seed domain of each rank's noise stream (gumbel, dropout); 1 is the data order


class Trainer(abc.ABC):
    """Shared loop: engine setup, data order, checkpoints, metrics, non-finite guard."""

    model_kind = ""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.faults = Faults.from_env()
        self.frozen_inputs: dict[str, dict[str, str]] = {}  # used, not trained (--dvae): checkpointed, compared
        self.setup_distributed()
        self.setup_engine()
        self.setup_data()
        torch.manual_seed(derive_seed(cfg.train.seed, NOISE, self.rank))  # per-rank noise streams
        self.step = 0
        self.non_finite = NonFiniteRun(self.engine.device)
        self.changed_settings: list[str] = []  # what a resume found changed since its checkpoint
        self.checkpoints_skipped = 0  # damaged or incomplete checkpoints --resume stepped over (whole run)
        self.metrics = MetricsLog(self.out, self.rank, cfg.logging.log_every, cfg.train.steps)
        if cfg.checkpoint.resume:
            self.resume()  # restores every rank's exact RNG state (and the comm hook's buffers)
        if self.comm_hook is not None:
            self._comm_seen = (self.comm_hook.bytes_sent, self.comm_hook.bytes_plain)

    # --- set-up phases -----------------------------------------------------------------------
    def setup_distributed(self) -> None:
        """Process group, output folders, the DeepSpeed JSON with its batch keys filled, and both
        configs written to ``<output>/`` (``run_config.yaml``, ``ds_config.json``)."""
        cfg = self.cfg
        init_distributed()
        self.rank, self.world = dd.rank(), dd.world_size()
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        dd.barrier()
        self.raw_ds_config = load_ds_config(cfg.deepspeed_config)
        self.checkpoints = Checkpointer(self.ckpt_dir, self.rank, cfg.checkpoint.keep, log=self.log)
        chosen = self.checkpoints.choose() if cfg.checkpoint.resume else None  # verified before the engine
        self.ds_config = reshard.prepared_ds_config(cfg, self.raw_ds_config, self.world, chosen, self.log)
        self.micro = self.ds_config["train_micro_batch_size_per_gpu"]
        self.accum = self.ds_config["gradient_accumulation_steps"]
        self.global_batch = self.ds_config["train_batch_size"]
        self.zero3 = zero_stage(self.ds_config) == 3
        if self.rank == 0:
            atomic_write_text(self.out / "run_config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            atomic_write_text(self.out / "ds_config.json", json.dumps(self.ds_config, indent=1) + "\n")

    def setup_engine(self) -> None:
        """Model (same initial weights on every rank), optimizer, engine, communication hook."""
        torch.manual_seed(self.cfg.train.seed)
        random.seed(self.cfg.train.seed)
        self.config = load_config(self.cfg.preset)
        self.model = self.build_model()
        if self.rank == 0:
            save_config(self.config, self.out / "model_config.yaml")
        self.scaler = self.install_grad_scaling()  # before compile and activation checkpointing wrap the blocks
        self.checkpointed = wrap_blocks(self.model_blocks(), self.ds_config, self.cfg.train.compile, self.log)
        optimizer, scheduler = self.build_optimizer(self.model)
        self.engine, self.optimizer, self.scheduler = ds_adapter.build_engine(
            self.model, self.ds_config, optimizer, scheduler
        )
        self.comm_hook = build_comm_hook(self.raw_ds_config.get("communication_hook"))
        if self.comm_hook is not None:
            ds_adapter.attach_comm_hook(self.engine, self.comm_hook)
            if self.scaler is not None:  # updates the scaler skips: stage the hook's residuals
                self.comm_hook.skips_non_finite = True
        self.on_engine()

    def install_grad_scaling(self) -> ResblockGradScaler | None:
        """Per-resblock gradient scaling when the DeepSpeed JSON has an enabled
        ``per_resblock_grad_scaling`` section (``training/grad_scaling``); None otherwise."""
        config = ResblockScalingConfig.from_ds_config(self.raw_ds_config)
        if config is None or not config.enabled:
            return None
        if not self.model_blocks():
            raise UsageError(
                f"{self.cfg.deepspeed_config}: per_resblock_grad_scaling applies to the transformer's residual "
                f"blocks; the {self.model_kind} trainer has none: remove the section"
            )
        return install_resblock_scaling(self.model, config, world_size=self.world)

    def setup_data(self) -> None:
        """The synthetic set in a seeded epoch order, or a stream of image-text shards."""
        data, seed = self.cfg.data, self.cfg.train.seed
        self.stream, self._stream_it, self.preview = None, None, None
        if data.source == "synthetic":
            self.dataset = self.build_dataset()
            self.order = EpochOrder(len(self.dataset), self.micro, self.rank, self.world, seed)
            return
        from ..data import DataConfig, StreamLoader

        stream = DataConfig(
            data.source,
            image_column=data.image_column,
            caption_column=data.caption_column,
            image_size=self.image_size(),
            shuffle_buffer=data.shuffle_buffer,
            seed=seed,
            english_only=data.english_only,
            caption_encoder=self.caption_encoder(),
        )
        self.stream = StreamLoader(stream, self.micro, self.rank, self.world, data.workers)

    # --- hooks for the concrete trainers -------------------------------------------------
    @abc.abstractmethod
    def build_model(self) -> torch.nn.Module: ...

    @abc.abstractmethod
    def model_blocks(self) -> torch.nn.ModuleList: ...

    @abc.abstractmethod
    def build_optimizer(self, model): ...

    @abc.abstractmethod
    def build_dataset(self): ...

    @abc.abstractmethod
    def image_size(self) -> int: ...

    @abc.abstractmethod
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor | float], int]:
        """(loss, metrics, tokens in the micro batch). Metrics are detached 0-d device tensors (read
        at logged steps only) or host floats; the token count is known on the host (from shapes)."""
        ...

    def write_images(self, step: int) -> None:
        """Called on every rank (under ZeRO-3 a forward pass gathers parameters collectively); rank 0
        writes."""

    def on_engine(self) -> None:
        """Called once the engine exists (its device and dtype are known)."""

    def caption_encoder(self):
        """What a stream's data workers tokenize captions with (None: the trainer does not need ids)."""
        return None

    def after_step(self) -> None:
        """Called after every optimizer step."""

    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    # --- data ----------------------------------------------------------------------------
    def batch(self, micro_step: int) -> dict:
        if self.stream is not None:  # its own position (restored on resume) replaces micro_step
            if self._stream_it is None:
                self._stream_it = iter(self.stream)
            batch = next(self._stream_it)
        else:
            items = [self.dataset[i] for i in self.order.indices(micro_step)]
            batch = {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items]}
        self.check_batch(batch)
        batch = batch_to_device(batch, self.engine.device)
        if "image" in batch:  # streams send uint8: converted here, on the device
            batch["image"] = as_float_image(batch["image"])
        if self.preview is None:
            self.preview = batch  # the first batch: what image grids show
        return batch

    def check_batch(self, batch: dict) -> None:
        """Validate a batch on the host, before it moves to the device (raise on bad input)."""

    # --- checkpoints ---------------------------------------------------------------------
    def save(self) -> None:
        client = {
            "step": self.step,
            "bad_steps": int(self.non_finite.run.item()),  # one host read per checkpoint
            "world_size": self.world,
            "model_config": self.config.to_dict(),
            "frozen": self.frozen_inputs,
            "samples_seen": self.step * self.global_batch,
            "run_config": self.cfg.to_dict(),
            "deepspeed_config": self.raw_ds_config,
            "checkpoints_skipped": self.checkpoints_skipped,
            "global_batch": self.global_batch,
        }
        if self.scaler is not None:  # every block's scale and counters (the same on every rank)
            client["grad_scaling"] = self.scaler.state_dict()
        rank_state = {}
        if self.comm_hook is not None:  # error-feedback buffers and Q's differ per rank
            rank_state["comm_hook"] = self.comm_hook.state_dict()
        if self.stream is not None:  # this rank's stream position and bad-input counts
            rank_state["data"] = self.stream.state_dict()
        self.checkpoints.save(
            self.engine,
            self.step,
            client,
            rank_state,
            self.extra_state(),
            before_complete=lambda: self.faults.in_save(self.step, self.rank),
            files={"run_config.yaml": self.out / "run_config.yaml", "ds_config.json": self.out / "ds_config.json"},
        )

    def resume(self) -> None:
        loaded = self.checkpoints.load(self.engine, check=fit_check(self.config.to_dict(), self.frozen_inputs))
        if loaded is None:
            self.log(f"--resume: no complete checkpoint in {self.ckpt_dir}; starting from scratch")
            return
        tag, client, rank_state, shared_state = loaded
        self.checkpoints_skipped = client.get("checkpoints_skipped", 0) + len(self.checkpoints.skipped)
        resharded = client["world_size"] != self.world  # the hook starts afresh, the data position is re-dealt
        self.changed_settings = resume_changes(client, self.cfg, self.raw_ds_config)
        for change in self.changed_settings:
            self.log(f"warning: --resume: setting changed since {tag}: {change}")
        self.step = client["step"]
        self.non_finite = NonFiniteRun(self.engine.device, client["bad_steps"])
        if self.scaler is not None and "grad_scaling" in client:
            self.scaler.load_state_dict(client["grad_scaling"], device=self.engine.device)
        if self.comm_hook is not None and "comm_hook" in rank_state:  # residuals and Q's: on this rank's device
            self.comm_hook.load_state_dict(rank_state["comm_hook"], device=self.engine.device, buffers=not resharded)
        if self.stream is not None and resharded:
            self.stream.load_state_dict(reshard.stream_state(self.ckpt_dir / tag, client["world_size"], self))
        elif self.stream is not None and "data" in rank_state:
            self.stream.load_state_dict(rank_state["data"])
        self.load_extra_state(shared_state)
        self.metrics.truncate_after(self.step)
        self.log(f"resumed from {tag} (step {self.step})")

    def export(self) -> Path:
        """Consolidated fp32 weights of the last checkpoint as ``<output>/final``."""
        final = self.out / "final"
        if self.rank == 0:
            shard = self.cfg.checkpoint.export_shard_bytes
            export_checkpoint(self.ckpt_dir, final, self.checkpoints.latest_tag(), shard)
        dd.barrier()
        return final

    def check_sync(self) -> str:
        """SHA-256 of all trainable parameters (gathered under ZeRO-3) and buffers, compared across ranks."""
        mine = check_ranks_identical(self.engine.module, self.zero3, self.out / f"param_sha256_rank{self.rank}.txt")
        self.log(f"parameters identical on all {self.world} ranks (sha256 {mine[:16]})")
        return mine

    # --- the loop ------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[dalle-ds] {msg}", flush=True)

    def run(self) -> None:
        cfg = self.cfg
        if cfg.logging.progress:
            self.metrics.open_bar(self.model_kind, self.step)
        self.engine.train()
        save_every, image_every = cfg.checkpoint.save_every, cfg.logging.image_every
        self.metrics.start_interval()
        while self.step < cfg.train.steps:
            record = self.train_step()
            if self.metrics.due(self.step):
                self.log_step(record)
            else:
                self.metrics.advance()
            stop_if_signalled(self.step, self.save)  # a rank got SIGTERM / SIGUSR1: all save this step, stop
            if save_every and self.step % save_every == 0 and self.step < cfg.train.steps:
                self.save()
            if image_every and self.step % image_every == 0:
                self.write_images(self.step)
        self.metrics.close()
        self.finish()

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``accum`` micro batches; returns its record, the micro batches'
        mean metrics still on the device (:meth:`log_step` reads them)."""
        totals: dict[str, torch.Tensor | float] = {}
        skipped_before = ds_adapter.skipped_steps(self.engine)
        scaler_skipped = False
        for m in range(self.accum):
            self.micro_step = self.step * self.accum + m
            loss, metrics, n_tok = self.compute_loss(self.batch(self.micro_step))
            ds_adapter.backward(self.engine, self.faults.loss(loss, self.step + 1))
            if self.scaler is not None and m == self.accum - 1:
                scaler_skipped = self.scaler_step()
            else:
                self.engine.step()
            self.metrics.interval_tokens += n_tok
            for k, v in metrics.items():
                v = (v.detach().float() if torch.is_tensor(v) else v) / self.accum
                totals[k] = totals[k] + v if k in totals else v
        self.step += 1
        self.non_finite.update(totals["loss"])
        ds_skipped = ds_adapter.skipped_steps(self.engine) > skipped_before  # fp16 overflow: update not applied
        if ds_skipped:
            ds_adapter.after_skipped_step(self.engine)
        self.last_comm = self.after_update(ds_skipped or scaler_skipped)
        self.faults.after_step(self.step, self.rank)
        return {
            "step": self.step,
            **{k: v if torch.is_tensor(v) else round(v, 6) for k, v in totals.items()},
            "lr": self.scheduler.get_last_lr()[0] if self.scheduler else None,
            "loss_scale": ds_adapter.loss_scale(self.engine),
            "skipped": ds_skipped or scaler_skipped,
            "skipped_steps": ds_adapter.skipped_steps(self.engine) + (self.scaler.skipped if self.scaler else 0),
            "checkpoints_skipped": self.checkpoints_skipped,
        }

    def log_step(self, record: dict[str, Any]) -> None:
        """A logged step, on every rank: the record and the non-finite counter read to the host in one
        transfer (:meth:`MetricsLog.host_record`), the record written (rank 0), the non-finite guard."""
        values = self.metrics.host_record({**record, "longest_bad_run": self.non_finite.longest}, self.world)
        longest_bad_run = int(values.pop("longest_bad_run"))
        self.non_finite.interval_done()
        if self.last_comm is not None:  # this rank's gradient traffic this step vs a plain fp32 all-reduce
            values.update(comm_bytes=self.last_comm[0], comm_bytes_plain=self.last_comm[1])
        if self.scaler is not None:  # min / median / max block scale, updates and skipped updates
            values.update(self.scaler.stats())
        self.metrics.write(self.engine, values)
        self.guard_non_finite(values["loss"], longest_bad_run)

    def scaler_step(self) -> bool:
        """The accumulation boundary under per-resblock scaling: every rank learns whether any block's
        gradient was non-finite (one all-reduce, one host sync), the engine steps with its optimizers'
        updates turned into no-ops if so, and the block scales grow or back off. Returns whether the
        update was skipped."""
        skip = self.scaler.check(all_reduce=lambda flags: dd.all_reduce(flags, op="max"))
        with contextlib.ExitStack() as stack:
            for optimizer in ds_adapter.inner_optimizers(self.engine):
                stack.enter_context(skipping_step(optimizer, skip))
            self.engine.step()
        self.scaler.update()
        if skip:
            self.log(f"step {self.step + 1}: non-finite gradients in {self.scaler.last_nonfinite}; update skipped")
        return skip

    def after_update(self, skipped: bool) -> tuple[int, int] | None:
        """Bookkeeping once the engine stepped (or skipped); returns the hook's (bytes sent, plain)."""
        comm = None
        if self.comm_hook is not None:
            now = (self.comm_hook.bytes_sent, self.comm_hook.bytes_plain)
            comm = (now[0] - self._comm_seen[0], now[1] - self._comm_seen[1])
            self._comm_seen = now
            self.comm_hook.step(skipped=skipped)
        self.after_step()
        return comm

    def guard_non_finite(self, loss: float, longest_bad_run: int) -> None:
        """Stop (after saving) when the loss was non-finite for ``--max-bad-steps`` steps in a row.
        The run is counted on the device and checked at logged steps: a run that reaches the limit
        between two logged steps stops the training at the next one (``--log-every 1``: at once)."""
        if longest_bad_run >= self.cfg.train.max_bad_steps:
            self.save()
            raise TrainingStopped(
                f"loss was non-finite for {longest_bad_run} consecutive steps (last {loss}) at step "
                f"{self.step}; stopped and saved {self.ckpt_dir}/step{self.step:08d}. Lower the learning "
                f"rate or check the data, then --resume."
            )

    def finish(self) -> None:
        """Final checkpoint, export, optional sync check, final images, the stream's counts over all ranks."""
        if self.checkpoints.latest_tag() != f"step{self.step:08d}":
            self.save()
        final = self.export()
        if self.cfg.logging.check_sync:
            self.check_sync()
        self.write_images(self.step)
        if self.stream is not None:
            counts = sum_over_ranks(self.stream.counters())  # bad-input and sample counters (collective)
            if self.rank == 0:
                atomic_write_text(self.out / "data_counts.json", json.dumps(counts, indent=1) + "\n")
            skipped = {k: v for k, v in counts.items() if k != "samples"}
            self.log(f"data: {counts.get('samples', 0)} samples used; skipped and counted: {skipped or 'none'}")
        self.log(f"done: {self.step} steps; weights in {final}")
