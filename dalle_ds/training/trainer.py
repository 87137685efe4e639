"""Training loops for the dVAE and the DALL-E transformer on DeepSpeed engines.

Launched with the plain DeepSpeed launcher (``deepspeed [--hostfile H] scripts/train_dalle.py
--deepspeed_config ds_configs/... --preset ...``). The engine policy comes from the JSON; the
trainer owns the model, the paper's optimiser and schedules, the data order, checkpoints and logs.

Data order is a pure function of (seed, global sample position): every rank reads a disjoint,
equally sized slice of a per-epoch permutation, and a resumed run continues at the saved position,
so resuming neither repeats nor skips samples.
"""

from __future__ import annotations

import abc
import argparse
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.nn.functional as F

from ..data.synthetic import ALL_COMBOS, SyntheticShapes, caption_of, holdout_combos
from ..distributed import collectives as dd
from ..distributed.ds_adapter import (
    DeepSpeedConfigError,
    after_skipped_step,
    apply_activation_checkpointing,
    backward,
    build_engine,
    cosine,
    load_ds_config,
    loss_scale,
    prepare_ds_config,
    zero_stage,
)
from ..distributed.powersgd import attach_comm_hook, build_comm_hook
from ..inference.serialization import load_dvae, save_model
from ..models.config import DalleConfig, DVAEConfig, load_config, save_config
from ..models.dalle import DALLE
from ..models.dvae import DiscreteVAE
from .checkpointing import COMPLETE, export_checkpoint, latest_complete_tag

__all__ = [
    "DVAETrainer",
    "DalleTrainer",
    "dalle_arg_parser",
    "dvae_arg_parser",
    "exit_process",
    "main_dalle",
    "main_dvae",
]


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (e.g. non-finite loss); a checkpoint was written first."""


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def base_arg_parser(description: str) -> argparse.ArgumentParser:
    import deepspeed

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--preset", required=True, help="model preset name or YAML config")
    p.add_argument(
        "--data",
        default="synthetic",
        help="'synthetic' (the captioned-shapes set made on the fly), or a stream: WebDataset/Parquet "
        "shards (folder or glob), an image folder with metadata.jsonl, or a hub dataset id",
    )
    p.add_argument("--image-column", default=None, help="stream: image column (default: auto)")
    p.add_argument("--caption-column", default=None, help="stream: caption column (default: auto)")
    p.add_argument("--data-workers", type=int, default=2, help="stream: data-loader workers per rank")
    p.add_argument("--shuffle-buffer", type=int, default=1000, help="stream: shuffle buffer per worker")
    p.add_argument(
        "--english-only",
        action="store_true",
        help="stream: skip captions the language detector does not find English (counted as non_english)",
    )
    p.add_argument("--data-size", type=int, default=4096, help="samples per epoch of the synthetic set")
    p.add_argument("--holdout", type=int, default=0, help="synthetic combinations held out of training")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps to train in all")
    p.add_argument("--micro-batch-size", type=int, default=None, help="per-rank micro batch (or the JSON's)")
    p.add_argument("--grad-accum", type=int, default=None, help="gradient accumulation steps (or the JSON's)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end only)")
    p.add_argument("--keep-checkpoints", type=int, default=2, help="complete checkpoints to keep")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--image-every", type=int, default=0, help="write a PNG grid every N steps (0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint")
    p.add_argument("--max-bad-steps", type=int, default=5, help="stop after this many non-finite losses in a row")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument(
        "--check-sync",
        action="store_true",
        help="at the end, check every rank holds identical parameters (hashes them all)",
    )
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    p.add_argument("--fail-at-step", type=int, default=None, help=argparse.SUPPRESS)  # tests: SIGKILL rank 1
    p.add_argument("--fail-in-save", type=int, default=None, help=argparse.SUPPRESS)  # tests: die mid-save
    p.add_argument("--inject-overflow-at", type=int, default=None, help=argparse.SUPPRESS)  # tests: inf loss
    deepspeed.add_config_arguments(p)
    return p


class Trainer(abc.ABC):
    """Shared loop: engine setup, data order, checkpoints, metrics, non-finite guard."""

    model_kind = ""

    def __init__(self, args: argparse.Namespace):

        self.args = args
        if not args.deepspeed_config:
            raise DeepSpeedConfigError("--deepspeed_config is required (see ds_configs/)")
        dd.init_distributed()
        self.rank, self.world = dd.rank(), dd.world_size()
        self.out = Path(args.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        dd.barrier()
        raw = load_ds_config(args.deepspeed_config)
        self.ds_config = prepare_ds_config(
            raw,
            world_size=self.world,
            micro_batch_size=args.micro_batch_size,
            gradient_accumulation_steps=args.grad_accum,
            source=str(args.deepspeed_config),
        )
        for monitor in ("csv_monitor", "tensorboard"):
            section = self.ds_config.get(monitor)
            if isinstance(section, dict) and section.get("enabled") and not section.get("output_path"):
                section["output_path"] = str(self.out / "monitor")
        self.micro = self.ds_config["train_micro_batch_size_per_gpu"]
        self.accum = self.ds_config["gradient_accumulation_steps"]
        self.global_batch = self.ds_config["train_batch_size"]

        torch.manual_seed(args.seed)  # same initial weights on every rank
        random.seed(args.seed)
        self.config = load_config(args.preset)
        self.model = self.build_model()
        if self.rank == 0:
            save_config(self.config, self.out / "model_config.yaml")
        self.checkpointed = apply_activation_checkpointing(self.model_blocks(), self.ds_config)
        optimizer, scheduler = self.build_optimizer(self.model)
        self.engine, self.optimizer, self.scheduler = build_engine(self.model, self.ds_config, optimizer, scheduler)
        self.comm_hook = build_comm_hook(raw.get("communication_hook"))
        if self.comm_hook is not None:
            attach_comm_hook(self.engine, self.comm_hook)
        self.on_engine()
        self.step = 0
        self.bad_steps = 0
        self.stream, self._stream_it, self.preview = None, None, None
        if args.data == "synthetic":
            self.dataset = self.build_dataset()
        else:
            from ..data.stream import DataConfig, StreamLoader

            cfg = DataConfig(
                args.data,
                image_column=args.image_column,
                caption_column=args.caption_column,
                image_size=self.image_size(),
                shuffle_buffer=args.shuffle_buffer,
                seed=args.seed,
                english_only=args.english_only,
                caption_encoder=self.caption_encoder(),
            )
            self.stream = StreamLoader(cfg, self.micro, self.rank, self.world, args.data_workers)
        self._perm: tuple[int, torch.Tensor | None] = (-1, None)  # (epoch, its permutation), built lazily
        torch.manual_seed(args.seed * 7919 + self.rank)  # per-rank noise streams (gumbel, dropout)
        if args.resume:
            self.resume()  # restores every rank's exact RNG state (and the comm hook's buffers)
        if self.comm_hook is not None:
            self._comm_seen = (self.comm_hook.bytes_sent, self.comm_hook.bytes_plain)

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

    def adamw(self, params, lr: float, betas: tuple[float, float], eps: float, weight_decay: float):
        """AdamW; DeepSpeed's CPU Adam when the config offloads optimizer states to CPU (unless the
        config sets ``zero_force_ds_cpu_optimizer: false``, which allows torch's AdamW there)."""
        offload = self.ds_config.get("zero_optimization", {}).get("offload_optimizer", {}) or {}
        if offload.get("device") == "cpu" and self.ds_config.get("zero_force_ds_cpu_optimizer", True):
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, adamw_mode=True)
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    @abc.abstractmethod
    def compute_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, float], int]:
        """(loss, metrics, tokens in the micro batch)."""
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
    def indices(self, micro_step: int) -> list[int]:
        """Dataset indices of this rank's micro batch number ``micro_step`` (global count)."""
        n = len(self.dataset)
        start = (micro_step * self.world + self.rank) * self.micro
        out = []
        for pos in range(start, start + self.micro):
            epoch, offset = divmod(pos, n)
            if self._perm[0] != epoch:
                g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + epoch)
                self._perm = (epoch, torch.randperm(n, generator=g))
            out.append(int(self._perm[1][offset]))
        return out

    def batch(self, micro_step: int) -> dict:
        if self.stream is not None:  # its own position (restored on resume) replaces micro_step
            if self._stream_it is None:
                self._stream_it = iter(self.stream)
            batch = next(self._stream_it)
        else:
            items = [self.dataset[i] for i in self.indices(micro_step)]
            batch = {"image": torch.stack([it["image"] for it in items]), "caption": [it["caption"] for it in items]}
        device = self.engine.device
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        if "image" in batch and batch["image"].dtype == torch.uint8:  # streamed images: convert on the device
            batch["image"] = batch["image"].float().div_(255)
        if self.preview is None:
            self.preview = batch  # the first batch: what image grids show
        return batch

    def data_counts(self) -> dict[str, int]:
        """Bad-input and sample counters of the stream summed over ranks (collective)."""
        total: dict[str, int] = {}
        for counts in dd.all_gather_object(self.stream.counters()):
            for k, v in counts.items():
                total[k] = total.get(k, 0) + v
        return dict(sorted(total.items()))

    # --- checkpoints ---------------------------------------------------------------------
    def save(self) -> None:
        tag = f"step{self.step:08d}"
        client = {
            "step": self.step,
            "bad_steps": self.bad_steps,
            "world_size": self.world,
            "model_config": self.config.to_dict(),
            "samples_seen": self.step * self.global_batch,
        }
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=client, save_latest=False)
        rng = _rng_state()
        if self.comm_hook is not None:  # error-feedback buffers and Q's differ per rank
            rng["comm_hook"] = self.comm_hook.state_dict()
        if self.stream is not None:  # this rank's stream position and bad-input counts
            rng["data"] = self.stream.state_dict()
        torch.save(rng, self.ckpt_dir / tag / f"rng_rank{self.rank}.pt")
        if self.rank == 0:
            torch.save(self.extra_state(), self.ckpt_dir / tag / "trainer_state.pt")
        if self.args.fail_in_save == self.step and self.rank == 1:
            os.kill(os.getpid(), 9)  # die after writing, before the checkpoint is marked complete
        dd.barrier()
        if self.rank == 0:
            _atomic_write_text(self.ckpt_dir / tag / COMPLETE, json.dumps(client) + "\n")
            _atomic_write_text(self.ckpt_dir / "latest", tag)
            complete = sorted(p for p in self.ckpt_dir.glob("step*") if (p / COMPLETE).exists())
            for old in complete[: -self.args.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        dd.barrier()

    def latest_complete_tag(self) -> str | None:
        return latest_complete_tag(self.ckpt_dir)

    def resume(self) -> None:
        tag = self.latest_complete_tag()
        if tag is None:
            self.log(f"--resume: no complete checkpoint in {self.ckpt_dir}; starting from scratch")
            return
        _, client = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        if client["world_size"] != self.world:
            self.log(f"resuming {tag} written by {client['world_size']} ranks on {self.world}: data order changes")
        self.step, self.bad_steps = client["step"], client["bad_steps"]
        rng_path = self.ckpt_dir / tag / f"rng_rank{self.rank}.pt"
        if rng_path.exists():
            rng = torch.load(rng_path, map_location="cpu", weights_only=True)  # RNG states live on the host
            _set_rng_state(rng)
            if self.comm_hook is not None and "comm_hook" in rng:  # residuals and Q's: on this rank's device
                self.comm_hook.load_state_dict(rng["comm_hook"], device=self.engine.device)
            if self.stream is not None and "data" in rng:
                self.stream.load_state_dict(rng["data"])
        state_path = self.ckpt_dir / tag / "trainer_state.pt"
        if state_path.exists():
            self.load_extra_state(torch.load(state_path, weights_only=True))
        if self.rank == 0:  # metrics past the checkpoint belong to the dead run: drop them
            metrics = self.out / "metrics.jsonl"
            if metrics.exists():
                keep = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
                _atomic_write_text(metrics, "".join(f"{ln}\n" for ln in keep))
        self.log(f"resumed from {tag} (step {self.step})")

    def export(self) -> Path:
        """Consolidated fp32 weights of the last checkpoint as ``<output>/final``."""
        final = self.out / "final"
        if self.rank == 0:
            export_checkpoint(self.ckpt_dir, final, tag=self.latest_complete_tag())
        dd.barrier()
        return final

    def check_sync(self) -> str:
        """SHA-256 of all trainable parameters (gathered under ZeRO-3) and buffers, compared across ranks."""
        import contextlib
        import hashlib

        import deepspeed

        params = [p for p in self.engine.module.parameters() if p.requires_grad]
        gather = (
            deepspeed.zero.GatheredParameters(params) if zero_stage(self.ds_config) == 3 else contextlib.nullcontext()
        )
        digest = hashlib.sha256()
        with gather:
            for p in params:
                digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        for b in self.engine.module.buffers():  # e.g. the dVAE's EMA codebook
            digest.update(b.detach().float().cpu().contiguous().numpy().tobytes())
        mine = digest.hexdigest()
        every = dd.all_gather_object(mine)
        _atomic_write_text(self.out / f"param_sha256_rank{self.rank}.txt", mine + "\n")
        if len(set(every)) != 1:
            raise RuntimeError(f"ranks hold different parameters: {every}")
        self.log(f"parameters identical on all {self.world} ranks (sha256 {mine[:16]})")
        return mine

    # --- loop ----------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.rank == 0:
            print(f"[dalle-ds] {msg}", flush=True)

    def run(self) -> None:
        args = self.args
        bar = None
        if self.rank == 0 and not args.no_progress:
            from tqdm import tqdm

            bar = tqdm(total=args.steps, initial=self.step, desc=self.model_kind, dynamic_ncols=True)
        metrics_path = self.out / "metrics.jsonl"
        self.engine.train()
        while self.step < args.steps:
            t0 = time.perf_counter()
            totals: dict[str, float] = {}
            tokens = 0
            skipped_before = self.engine.skipped_steps
            for m in range(self.accum):
                self.micro_step = self.step * self.accum + m
                batch = self.batch(self.micro_step)
                loss, metrics, n_tok = self.compute_loss(batch)
                if args.inject_overflow_at == self.step + 1:  # tests: an fp16 overflow in backward
                    loss = loss * float("inf")
                backward(self.engine, loss)
                self.engine.step()
                tokens += n_tok
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + v / self.accum
            self.step += 1
            skipped = self.engine.skipped_steps - skipped_before  # fp16 overflow: update not applied
            if skipped:
                after_skipped_step(self.engine)
            comm = None
            if self.comm_hook is not None:
                now = (self.comm_hook.bytes_sent, self.comm_hook.bytes_plain)
                comm = (now[0] - self._comm_seen[0], now[1] - self._comm_seen[1])
                self._comm_seen = now
                self.comm_hook.step(skipped=bool(skipped))
            self.after_step()
            if args.fail_at_step is not None and self.step == args.fail_at_step and self.rank == 1:
                os.kill(os.getpid(), 9)
            loss_value = totals["loss"]
            self.bad_steps = 0 if math.isfinite(loss_value) else self.bad_steps + 1
            elapsed = time.perf_counter() - t0
            record = {
                "step": self.step,
                **{k: round(v, 6) for k, v in totals.items()},
                "lr": self.scheduler.get_last_lr()[0] if self.scheduler else None,
                "loss_scale": loss_scale(self.engine),
                "skipped": bool(skipped),
                "skipped_steps": self.engine.skipped_steps,
                "tokens_per_s": round(tokens * self.world / elapsed, 1),
                "peak_rss_mb": _peak_rss_mb_all_ranks(),
            }
            if comm is not None:  # this rank's gradient traffic this step vs a plain fp32 all-reduce
                record.update(comm_bytes=comm[0], comm_bytes_plain=comm[1])
            if self.rank == 0:
                if self.step % args.log_every == 0 or self.step == args.steps:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(record) + "\n")
                if self.engine.monitor.enabled:
                    self.engine.monitor.write_events(
                        [(f"Train/{k}", v, self.step) for k, v in record.items() if isinstance(v, float)]
                    )
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{loss_value:.4f}",
                        tok_s=f"{record['tokens_per_s']:.0f}",
                        scale=record["loss_scale"],
                        skipped=record["skipped_steps"],
                    )
            if self.bad_steps >= args.max_bad_steps:
                self.save()
                raise TrainingStopped(
                    f"loss was non-finite for {self.bad_steps} consecutive steps (last {loss_value}) at step "
                    f"{self.step}; stopped and saved {self.ckpt_dir}/step{self.step:08d}. Lower the learning "
                    f"rate or check the data, then --resume."
                )
            if args.save_every and self.step % args.save_every == 0 and self.step < args.steps:
                self.save()
            if args.image_every and self.step % args.image_every == 0:
                self.write_images(self.step)
        if bar is not None:
            bar.close()
        if self.latest_complete_tag() != f"step{self.step:08d}":
            self.save()
        final = self.export()
        if args.check_sync:
            self.check_sync()
        self.write_images(self.step)
        if self.stream is not None:
            counts = self.data_counts()
            if self.rank == 0:
                _atomic_write_text(self.out / "data_counts.json", json.dumps(counts, indent=1) + "\n")
            skipped = {k: v for k, v in counts.items() if k != "samples"}
            self.log(f"data: {counts.get('samples', 0)} samples used; skipped and counted: {skipped or 'none'}")
        self.log(f"done: {self.step} steps; weights in {final}")


def _peak_rss_mb_all_ranks() -> float:
    """Largest peak resident memory (VmHWM) over all ranks, in MiB (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        kib = 0
    return round(dd.host_all_reduce(kib / 1024.0, op="max"), 1)


def _rng_state() -> dict[str, Any]:
    """Every random generator a training step draws from, on every device of this process."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "gauss": gauss},
    }  # fmt: skip
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device (the current one)
    try:  # DeepSpeed's activation-checkpointing tracker (partitioned activations); empty otherwise
        from deepspeed.runtime.activation_checkpointing.checkpointing import get_cuda_rng_tracker

        tracked = get_cuda_rng_tracker().get_states()
        if tracked:
            state["ds_checkpointing"] = tracked
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_python_state(state["python"]))
    if "numpy" in state:
        n = state["numpy"]
        np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    if "cuda" in state:
        if torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        else:
            warnings.warn("the checkpoint holds a CUDA RNG state but CUDA is not available here", stacklevel=2)
    if "ds_checkpointing" in state:
        from deepspeed.runtime.activation_checkpointing.checkpointing import get_cuda_rng_tracker

        get_cuda_rng_tracker().set_states(state["ds_checkpointing"])


def _lambda_lr(factor):
    """A scheduler factory: DeepSpeed builds it on the optimizer it actually steps (ZeRO regroups
    parameters, so a scheduler made on the client optimizer would hold the wrong groups)."""
    return lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _as_python_state(state):
    """random.setstate needs tuples; a saved state may come back with lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


# ----------------------------------------------------------------------------------------
class DVAETrainer(Trainer):
    """The paper's dVAE recipe, schedules scaled to the run: tau 1 -> 1/16 and KL weight 0 -> 6.6
    (cosine), LR cosine, AdamW(0.9, 0.999, 1e-8, wd 1e-4), optional EMA of the weights.
    A ``quantizer: vq`` config trains with the EMA codebook instead (``--commitment``), its
    statistics summed over ranks so every rank keeps the same codebook."""

    model_kind = "dvae"

    def build_model(self):
        if not isinstance(self.config, DVAEConfig):
            raise DeepSpeedConfigError(f"--preset {self.args.preset} is not a dVAE config")
        if self.args.ema and zero_stage(self.ds_config) == 3:
            raise DeepSpeedConfigError("--ema needs whole parameters on every rank: use ZeRO stage 0-2 for the dVAE")
        model = DiscreteVAE(self.config)
        if model.quantizer is not None and self.world > 1:
            model.quantizer.collectives = dd.TorchCollectives()
        self.ema = {k: v.detach().clone().float() for k, v in model.state_dict().items()} if self.args.ema else None
        return model

    def model_blocks(self):
        return torch.nn.ModuleList()

    def build_optimizer(self, model):
        a = self.args
        lr = a.lr if a.lr is not None else 1e-4
        opt = self.adamw(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
        sched = _lambda_lr(lambda s: cosine(s, a.steps, 1.0, a.lr_end / lr))
        return opt, sched

    def build_dataset(self):
        # --holdout keeps the same combinations out of the tokenizer as the transformer trainer does.
        held = holdout_combos(self.args.holdout)
        return SyntheticShapes(self.args.data_size, self.config.image_size, seed=self.args.seed, exclude=held)

    def image_size(self) -> int:
        return self.config.image_size

    def schedules(self) -> tuple[float, float]:
        a = self.args
        tau_steps = a.temperature_steps or a.steps
        kl_steps = a.kl_steps or max(1, a.steps // 30)
        return (
            cosine(self.step, tau_steps, a.temperature_start, a.temperature_end),
            cosine(self.step, kl_steps, 0.0, a.kl_weight),
        )

    def compute_loss(self, batch):
        if "image" not in batch:
            raise DeepSpeedConfigError(f"--data {self.args.data} holds precomputed codes; the dVAE trains on images")
        a = self.args
        recon = a.recon_loss
        if self.config.quantizer == "vq":
            out = self.engine(batch["image"], commitment=a.commitment, recon_loss=recon)
            extra = {"commitment": out.commitment.item()}
        else:
            tau, beta = self.schedules()
            out = self.engine(batch["image"], temperature=tau, kl_weight=beta, recon_loss=recon)
            extra = {"kl": out.kl.item(), "temperature": tau, "kl_weight": beta}
        codes = out.logits.argmax(1)
        usage = codes.unique().numel() / self.config.codebook_size
        metrics = {
            "loss": out.loss.item(),
            **({"recon_nll": out.recon_nll.item()} if recon == "logit_laplace" else {}),  # (log b untrained)
            "mse": F.mse_loss(out.reconstruction, batch["image"].float()).item(),
            **extra,
            "codebook_usage": usage,
        }
        return out.loss, metrics, codes.numel()

    def after_step(self):
        if self.ema is not None:
            with torch.no_grad():
                for k, v in self.engine.module.state_dict().items():
                    self.ema[k].mul_(self.args.ema_decay).add_(v.float(), alpha=1 - self.args.ema_decay)

    def export(self):
        final = super().export()
        if self.ema is not None and self.rank == 0:
            model = DiscreteVAE(self.config)
            model.load_state_dict(self.ema)
            save_model(model, self.out / "final_ema")
        return final

    def extra_state(self):
        return {"ema": self.ema} if self.ema is not None else {}

    def load_extra_state(self, state):
        if self.ema is not None and "ema" in state:
            self.ema = state["ema"]

    def write_images(self, step: int) -> None:
        from ..utils.images import save_grid

        if self.preview is None or (self.rank != 0 and zero_stage(self.ds_config) != 3):
            return
        x = self.preview["image"][:8]
        module = self.engine.module
        with torch.no_grad():  # under ZeRO-3 every rank runs this: the forward gathers parameters
            recon = module.decode(module.encode(x))
        if self.rank == 0:
            save_grid(torch.cat([x, recon.float()]), self.out / "images" / f"recon_{step:08d}.png", nrow=len(x))


class DalleTrainer(Trainer):
    """The paper's transformer recipe: AdamW(0.9, 0.96, 1e-8, wd 4.5e-2, none on gains, biases and
    embeddings), linear warmup then cosine decay, clipping from the JSON (``gradient_clipping``)."""

    model_kind = "dalle"

    def build_model(self):
        if not isinstance(self.config, DalleConfig):
            raise DeepSpeedConfigError(f"--preset {self.args.preset} is not a DALL-E config")
        if not self.args.dvae:
            raise DeepSpeedConfigError("--dvae DIR (a trained dVAE folder) is required to turn images into codes")
        self.dvae = load_dvae(self.args.dvae)
        self.tokenizer = self._tokenizer()
        if zero_stage(self.ds_config) == 3:
            import deepspeed

            with deepspeed.zero.Init(config_dict_or_path=self.ds_config):
                model = DALLE(self.config)
            # Init inside zero.Init ran on already-partitioned (empty) parameters: redo it, one
            # module gathered at a time, so weights equal those of an unsharded run.
            model.init_weights(gather=lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0))
            for param in model.external_parameters():  # tied unembeddings are read in DALLE.forward
                deepspeed.zero.register_external_parameter(model, param)
        else:
            model = DALLE(self.config)
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
        return CaptionEncoder(
            self.tokenizer, self.config, self.args.bpe_dropout, seed=self.args.seed * 65_537 + self.rank
        )

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) pixels -> (B, grid, grid) codes with the frozen fp32 dVAE (whatever the engine's
        dtype); codes precomputed by scripts/encode_images.py skip this."""
        return self.dvae.encode(images)

    def _tokenizer(self):
        from ..data.text import load_tokenizer, train_tokenizer

        path = self.out / "tokenizer.json"
        if self.args.tokenizer:
            self.tokenizer_path = Path(self.args.tokenizer)
            return load_tokenizer(self.args.tokenizer)
        self.tokenizer_path = path
        if self.rank == 0 and not path.exists():
            if self.args.data == "synthetic":
                captions = [caption_of(c) for c in ALL_COMBOS]
            else:  # a quick one from the stream's first captions; train a real one with train_tokenizer.py
                import itertools

                from ..data.stream import DataConfig, iter_captions

                source = DataConfig(
                    self.args.data, caption_column=self.args.caption_column, english_only=self.args.english_only
                )
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
            a = self.args
            settings = {"name": a.preset, "steps": self.step, "global batch": self.global_batch,
                        "learning rate": a.lr, "data": a.data, "DeepSpeed config": a.deepspeed_config,
                        "ranks": self.world}  # fmt: skip
            grids = sorted((self.out / "images").glob("samples_*.png"))
            write_model_card(final, settings, sample_grid=grids[-1] if grids else None)
        dd.barrier()
        return final

    def model_blocks(self):
        return self.model.blocks

    def build_optimizer(self, model):
        from ..distributed.ds_adapter import param_groups

        a = self.args
        lr = a.lr if a.lr is not None else 4.5e-4
        opt = self.adamw(param_groups(model, 4.5e-2), lr=lr, betas=(0.9, 0.96), eps=1e-8, weight_decay=4.5e-2)
        warmup = a.warmup_steps if a.warmup_steps is not None else max(1, a.steps // 20)

        def factor(s):
            return (s + 1) / warmup if s < warmup else cosine(s - warmup, a.steps - warmup, 1.0, 0.1)

        return opt, _lambda_lr(factor)

    def build_dataset(self):
        # Held-out combinations (zero-shot evaluation) are a fixed function of the count.
        self.holdout = holdout_combos(self.args.holdout)
        if self.rank == 0:
            _atomic_write_text(self.out / "holdout.json", json.dumps([caption_of(c) for c in self.holdout]) + "\n")
        return SyntheticShapes(
            self.args.data_size, self.dvae.config.image_size, seed=self.args.seed, exclude=self.holdout
        )

    def image_size(self) -> int:
        return self.dvae.config.image_size

    def write_images(self, step: int) -> None:
        from ..data.text import encode_captions
        from ..utils.images import save_grid

        if zero_stage(self.ds_config) == 3 or self.rank != 0:
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
        _atomic_write_text(self.out / "images" / f"samples_{step:08d}.txt", "\n".join(captions) + "\n")

    def compute_loss(self, batch):
        from ..data.text import encode_captions

        if "text" in batch:  # a stream's batch, tokenized by its data worker
            text = batch["text"]
        else:  # dropout decisions a pure function of (seed, rank, micro step): resumed runs repeat them
            dropout = self.args.bpe_dropout
            rng = np.random.default_rng([self.args.seed, self.rank, self.micro_step]) if dropout > 0 else None
            text = encode_captions(self.tokenizer, batch["caption"], self.config, bpe_dropout=dropout, rng=rng)
        text = text.to(self.engine.device)
        codes = batch["codes"] if "codes" in batch else self.encode_images(batch["image"])
        out = self.engine(text, image_codes=codes)
        metrics = {"loss": out.loss.item(), "text_loss": out.text_loss.item(), "image_loss": out.image_loss.item()}
        return out.loss, metrics, text.numel() + text.shape[0] * self.config.image_len


def dvae_arg_parser() -> argparse.ArgumentParser:
    p = base_arg_parser("Train the discrete VAE (image tokenizer) with DeepSpeed.")
    p.add_argument("--lr-end", type=float, default=1.25e-6)
    p.add_argument("--temperature-start", type=float, default=1.0)
    p.add_argument("--temperature-end", type=float, default=1 / 16)
    p.add_argument("--temperature-steps", type=int, default=0, help="anneal length (0: the whole run)")
    p.add_argument("--kl-weight", type=float, default=6.6)
    p.add_argument("--kl-steps", type=int, default=0, help="KL warm-up length (0: steps / 30)")
    p.add_argument("--commitment", type=float, default=0.25, help="vq quantizer: commitment loss weight")
    p.add_argument(
        "--recon-loss",
        choices=("logit_laplace", "mse"),
        default="logit_laplace",
        help="reconstruction term: the paper's logit-Laplace NLL, or MSE (small images of flat shapes)",
    )
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights (exported as final_ema)")
    p.add_argument("--ema-decay", type=float, default=0.999)
    return p


def dalle_arg_parser() -> argparse.ArgumentParser:
    p = base_arg_parser("Train the DALL-E transformer with DeepSpeed.")
    p.add_argument("--dvae", required=False, help="trained dVAE folder (config.json + model.safetensors)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: train one on the captions)")
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--bpe-dropout", type=float, default=0.1, help="BPE dropout (seeded by seed, rank and step)")
    return p


def main_dvae(argv=None) -> int:
    return _run(DVAETrainer, dvae_arg_parser().parse_args(argv))


def main_dalle(argv=None) -> int:
    return _run(DalleTrainer, dalle_arg_parser().parse_args(argv))


def exit_process(code: int) -> NoReturn:
    """End a trainer process: Python's exit handlers run (monitors such as wandb finish, logging
    flushes), then the process leaves without interpreter finalisation. Process groups are already
    destroyed by then, but C++ objects DeepSpeed and torch still hold (gloo contexts, work threads)
    are torn down at finalisation in no particular order, and a finished rank sometimes aborts there
    ("terminate called without an active exception", exit code 250): a scheduler would count a
    completed run as failed."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(code)


def _run(cls, args) -> int:
    try:
        cls(args).run()
        code = 0
    except (DeepSpeedConfigError, TrainingStopped) as err:  # raised on every rank alike
        print(f"error: {err}", file=sys.stderr, flush=True)
        code = 2
    # Tear the process groups down before the interpreter does: gloo work left to exit-time
    # destructors can abort the process ("terminate called without an active exception"). Not on
    # an unexpected error: destroying while peers are mid-collective can hang, and the launcher
    # stops the other ranks anyway.
    dd.destroy()
    return code
