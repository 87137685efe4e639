"""Host reads in the training loop: none per micro batch, a fixed few per optimizer step.

On a GPU every read of a device tensor's value on the host (``item``, ``tolist``, ``bool(t)``,
``float(t)``, ``int(t)``, ``.cpu()``) waits for the stream to drain. These tests patch those methods
of ``torch.Tensor`` around in-process training runs (ZeRO 2, one rank, the CPU) and count the calls
per optimizer step, with their origin. Measured with DeepSpeed 0.19.8 at ZeRO 2 (also on 2 ranks):
DeepSpeed itself reads nothing per micro batch; per optimizer step it checks the gradient norm once,
then once per parameter group (``is_invalid_grad_norm``), and torch's plain AdamW reads its host-side
step counter once per group (ZeRO 2: one flat partition per group; the DALL-E transformer has two
groups, decayed or not, the dVAE one). dalle-ds reads nothing in a
step that is not logged and two values at a logged step: the record's tensors in one stacked
``tolist`` and the peak-memory all-reduce. The only calls left out are those of the host-side data
order (``dalle_ds/data``: it indexes a CPU permutation, a host tensor on every machine, per sample).
"""

import collections
import math
import re
import traceback
from pathlib import Path

import pytest
import torch
from launching import ds_config, metrics, train_args

from dalle_ds import get_preset
from dalle_ds.distributed import ds_adapter
from dalle_ds.models.dalle import check_token_ranges
from dalle_ds.training import (
    DalleRunConfig,
    DalleTrainer,
    DVAERunConfig,
    DVAETrainer,
    TrainingStopped,
    parse_run_config,
)
from dalle_ds.training.dvae_trainer import codebook_usage
from dalle_ds.training.metrics import NonFiniteRun, read_to_host
from dalle_ds.training.optim import adamw, fused_adamw
from dalle_ds.training.transfer import batch_to_device, pins_batches

READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu")
PACKAGE = Path(__file__).resolve().parents[1] / "dalle_ds"
STEPS = 3
PER_LOGGED_STEP = {"dalle_ds": 2}  # the record's stacked tolist, the peak-memory all-reduce


def per_step(groups: int) -> dict[str, int]:
    """Host reads per optimizer step at ZeRO 2 on the CPU, whatever the accumulation, for ``groups``
    parameter groups: DeepSpeed's gradient-norm checks, torch AdamW's step counters; none of dalle-ds."""
    return {"deepspeed": 1 + groups, "torch": groups}


def origin(stack: traceback.StackSummary) -> str | None:
    """Who read: "dalle_ds", "deepspeed" or "torch" by the innermost caller's file; None for the
    data order's host tensors (left out)."""
    caller = Path(stack[-2].filename).resolve()
    if caller.is_relative_to(PACKAGE / "data"):
        return None
    if caller.is_relative_to(PACKAGE):
        return "dalle_ds"
    return "deepspeed" if "deepspeed" in caller.parts else "torch"


class HostReads:
    """Counts calls of ``torch.Tensor``'s host-read methods by origin while active."""

    def __init__(self):
        self.counts: collections.Counter = collections.Counter()

    def take(self) -> dict[str, int]:
        counts, self.counts = dict(self.counts), collections.Counter()
        return counts

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in READS}
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, self._counting(name, method))
        return self

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)

    def _counting(self, name, method):
        def counted(tensor, *args, **kwargs):
            stack = traceback.extract_stack(limit=3)
            who = origin(stack)
            if who is not None:
                self.counts[who] += 1
            return method(tensor, *args, **kwargs)

        return counted


def counted_run(trainer) -> tuple[list[dict], list[dict]]:
    """Run ``trainer``; the host reads of each :meth:`train_step` and of each :meth:`log_step`."""
    steps, logged = [], []
    train_step, log_step = trainer.train_step, trainer.log_step

    def counted_step():
        reads.take()
        record = train_step()
        steps.append(reads.take())
        return record

    def counted_log(record):
        reads.take()
        log_step(record)
        logged.append(reads.take())

    trainer.train_step, trainer.log_step = counted_step, counted_log
    with HostReads() as reads:
        trainer.run()
    return steps, logged


def dalle_trainer(tmp: Path, dvae_dir: Path, accum: int) -> DalleTrainer:
    out = tmp / f"dalle_accum{accum}"
    extra = ("--grad-accum", accum, "--log-every", 100, "--save-every", 0)
    args = [str(a) for a in train_args(dvae_dir, out, ds_config(tmp, 2), *extra)]
    args[args.index("--steps") + 1] = str(STEPS)
    return DalleTrainer(parse_run_config(DalleRunConfig, args))


@pytest.mark.parametrize("accum", [1, 4])
def test_dalle_steps_read_the_same_few_values_at_any_accumulation(accum, tmp_path, dvae_dir, single_process_group):
    steps, logged = counted_run(dalle_trainer(tmp_path, dvae_dir, accum))
    assert steps == [per_step(groups=2)] * STEPS  # 5: nothing from dalle-ds, nothing per micro batch
    assert logged == [PER_LOGGED_STEP]  # --log-every 100: the last step only
    rows = metrics(tmp_path / f"dalle_accum{accum}")
    assert [r["step"] for r in rows] == [STEPS] and rows[0]["tokens_per_s"] > 0


@pytest.mark.parametrize("accum", [1, 4])
def test_dvae_steps_read_the_same_few_values_at_any_accumulation(accum, tmp_path, single_process_group):
    out = tmp_path / f"dvae_accum{accum}"
    args = ["--deepspeed_config", ds_config(tmp_path, 2), "--preset", "dvae-tiny", "--output-dir", out]
    args += ["--steps", STEPS, "--micro-batch-size", 2, "--grad-accum", accum, "--log-every", 2, "--no-progress"]
    args += ["--data-size", 64, "--save-every", 0]
    steps, logged = counted_run(DVAETrainer(parse_run_config(DVAERunConfig, [str(a) for a in args])))
    assert steps == [per_step(groups=1)] * STEPS  # 3
    assert logged == [PER_LOGGED_STEP] * 2  # steps 2 and 3 (the last)
    rows = metrics(out)
    assert [r["step"] for r in rows] == [2, 3]
    assert all(0 < r["codebook_usage"] <= 1 and r["kl_weight"] >= 0 for r in rows)


def test_codebook_usage_counts_distinct_codes_on_the_device():
    codes = torch.tensor([[[0, 3], [3, 7]], [[7, 7], [0, 9]]])
    usage = codebook_usage(codes, codebook_size=16)
    assert usage.dim() == 0 and usage.item() == codes.unique().numel() / 16 == 4 / 16


def test_token_range_errors_name_the_bad_value():
    config = get_preset("dalle-tiny")
    text_end, codes_end = config.text_vocab_with_pad, config.image_vocab_size
    with pytest.raises(ValueError, match=rf"image codes must lie in \[0, {codes_end}\), got {codes_end + 1}"):
        check_token_ranges(config, image_codes=torch.tensor([[0, codes_end + 1]]))
    with pytest.raises(ValueError, match=rf"text ids must lie in \[0, {text_end}\) \(vocab .*\), got -1"):
        check_token_ranges(config, text=torch.tensor([[-1, 3]]))
    check_token_ranges(config, torch.tensor([[0, text_end - 1]]), torch.tensor([[0, codes_end - 1]]))  # no error


def test_a_stream_batch_with_bad_codes_is_refused_on_the_host(tmp_path, dvae_dir, single_process_group):
    trainer = dalle_trainer(tmp_path, dvae_dir, 1)
    config = trainer.config
    good = {"codes": torch.zeros(2, config.image_len, dtype=torch.long), "caption": ["a", "b"]}
    trainer.check_batch(good)
    bad = dict(good, codes=torch.full((2, config.image_len), config.image_vocab_size))
    with pytest.raises(ValueError, match=f"got {config.image_vocab_size}"):
        trainer.check_batch(bad)


def test_batches_are_pinned_for_cuda_only():
    assert pins_batches("cuda") and pins_batches(torch.device("cuda", 1))
    assert not pins_batches("cpu") and not pins_batches(torch.device("cpu"))
    batch = {"image": torch.zeros(2, 3), "caption": ["x", "y"]}
    moved = batch_to_device(batch, torch.device("cpu"))  # the CPU path: no pinning, tensors as they are
    assert moved["caption"] == ["x", "y"] and moved["image"] is batch["image"]


def test_adamw_is_fused_for_parameters_on_cuda_only(monkeypatch):
    assert fused_adamw("cuda", offloaded=False)
    assert not fused_adamw("cuda", offloaded=True)  # states stepped on the CPU
    assert not fused_adamw("cpu", offloaded=False) and not fused_adamw("xpu", offloaded=False)
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = adamw(params, {}, lr=1e-3, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.0)
    assert type(opt) is torch.optim.AdamW and not opt.defaults["fused"]  # this machine's accelerator: cpu
    monkeypatch.setattr(ds_adapter, "accelerator", lambda: ("cuda", "nccl"))
    opt = adamw(params, {}, lr=1e-3, betas=(0.9, 0.96), eps=1e-8, weight_decay=0.0)
    assert opt.defaults["fused"] is True
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    opt = adamw(params, {**offload, "zero_force_ds_cpu_optimizer": False}, lr=1e-3, betas=(0.9, 0.96), eps=1e-8,
                weight_decay=0.0)  # fmt: skip
    assert not opt.defaults["fused"]


def test_the_non_finite_run_is_counted_on_the_device():
    run = NonFiniteRun("cpu")
    for loss in [1.0, math.nan, math.inf, 2.0, -math.inf]:
        run.update(torch.tensor(loss))
    assert run.run.item() == 1 and run.longest.item() == 2  # the longest run since the last read
    run.interval_done()
    assert run.longest.item() == 1
    assert NonFiniteRun("cpu", run=3).run.item() == 3  # restored from a checkpoint


def test_read_to_host_reads_every_tensor_in_one_transfer():
    values = {"step": 4, "loss": torch.tensor(0.1234567), "kl": torch.tensor(2.0), "tau": 0.5}
    with HostReads() as reads:
        host = read_to_host(values, ndigits=6)
    assert reads.take() == {"dalle_ds": 1}
    assert host == {"step": 4, "loss": 0.123457, "kl": 2.0, "tau": 0.5} and list(host) == list(values)


def test_a_non_finite_run_stops_training_at_the_next_logged_step(tmp_path, dvae_dir, single_process_group):
    """The counter is read at logged steps only: with --log-every 4 the run stops at a multiple of 4,
    with a checkpoint of that step, and the message gives the run's length up to there."""
    out = tmp_path / "diverge"
    args = [str(a) for a in train_args(dvae_dir, out, ds_config(tmp_path, 2), "--max-bad-steps", 2, "--log-every", 4)]
    args[args.index("--lr") + 1] = "1e6"  # Adam takes ~lr-sized steps: the weights blow up at once
    args[args.index("--steps") + 1] = "30"
    with pytest.raises(TrainingStopped, match=r"loss was non-finite for (\d+) consecutive steps") as stopped:
        DalleTrainer(parse_run_config(DalleRunConfig, args)).run()
    rows = metrics(out)
    stopped_at = rows[-1]["step"]
    assert [r["step"] for r in rows] == list(range(4, stopped_at + 1, 4)) and not math.isfinite(rows[-1]["loss"])
    assert (out / "checkpoints" / "latest").read_text() == f"step{stopped_at:08d}"
    length = int(re.search(r"for (\d+) consecutive", str(stopped.value)).group(1))
    assert 2 <= length <= stopped_at - 1  # the first step's loss (before any update) is finite
