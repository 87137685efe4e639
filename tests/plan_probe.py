"""Test-only rank script: train a tiny DALL-E under a DeepSpeed engine and write what the dry run
predicts, measured (tests/test_plan_validation.py starts it on 2 or 4 forked ranks).

``plan_probe.py --local_rank=R SPEC_JSON OUT_DIR`` writes ``OUT_DIR/rank<R>.json`` with
- ``states``: bytes of the buffers DeepSpeed holds after two optimizer steps (the 16-bit flat groups
  or ZeRO-3 partitions and persistent parameters, the fp32 master partitions, Adam's moments);
- ``gradients``: the gradient storages held outside the reduce buckets as a bucket's reduction
  starts and ends (``at_reduce``) and as the inner optimizer steps (``at_step``), and the reduce
  buckets' bytes (``ipg_bucket``); storages are counted whole (a view keeps its storage alive);
- ``saved``: peak bytes autograd holds for backward during the second step's first micro batch
  (unique storages, parameters excluded, DeepSpeed's checkpointed block inputs included);
- ``collectives``: every torch.distributed call (DeepSpeed's included) between the end of the first
  optimizer step and the end of the second: op, the group's ranks, payload bytes as the planner
  counts them (an all-reduce's or reduce's tensor, a reduce-scatter's input, an all-gather's output);
- ``rss_baseline`` / ``rss_peak``: the process's RSS before the model existed and its peak while
  training (``rss_built``, ``rss_build_peak``: after and during the engine's construction);
  ``rss_file_baseline`` / ``rss_file_end``: the file-backed part of the RSS (library code the run
  faults in) then and after training.

SPEC_JSON: {"preset", "overrides", "ds" (DeepSpeed JSON, ``communication_hook`` included), "micro_batch",
"grad_accum", "local_size" (ranks per faked node, for hierarchical PowerSGD)}.
"""

import contextlib
import ctypes
import json
import os
import sys
import weakref

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

RECORD = {"on": False, "calls": [], "depth": 0}
# op -> (position, keyword) of the argument whose bytes the planner counts
PAYLOAD = {
    "all_reduce": (0, "tensor"), "reduce": (0, "tensor"), "broadcast": (0, "tensor"),
    "reduce_scatter_single": (1, "input"), "reduce_scatter_tensor": (1, "input"), "_reduce_scatter_base": (1, "input"),
    "reduce_scatter": (1, "input_list"), "all_gather_single": (0, "output_tensor"),
    "all_gather_into_tensor": (0, "output_tensor"), "_all_gather_base": (0, "output"), "all_gather": (0, "tensor_list"),
}  # fmt: skip


def _nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return sum(_nbytes(v) for v in value)


def _install_recorder() -> None:
    """Wrap torch.distributed's collectives (before DeepSpeed's comm backend captures them)."""
    for op, (index, keyword) in PAYLOAD.items():
        fn = getattr(c10d, op, None)
        if fn is None:
            continue

        def wrapper(*args, _fn=fn, _op=op, _index=index, _keyword=keyword, **kwargs):
            if RECORD["on"] and not RECORD["depth"]:  # an old name calling its new one records once
                payload = kwargs.get(_keyword, args[_index] if len(args) > _index else None)
                group = kwargs.get("group")
                ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
                RECORD["calls"].append({"op": _op, "ranks": ranks, "bytes": _nbytes(payload)})
            RECORD["depth"] += 1
            try:
                return _fn(*args, **kwargs)
            finally:
                RECORD["depth"] -= 1

        setattr(c10d, op, wrapper)
        if hasattr(dist, op):
            setattr(dist, op, wrapper)


def _rss(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


class SavedBytes:
    """Live bytes of the storages autograd keeps for backward (parameters excluded), and their peak.

    DeepSpeed's activation checkpointing keeps each block's input on its autograd node
    (``ctx.deepspeed_saved_tensors``), out of reach of saved-tensor hooks: while :meth:`hooks` is
    active its ``checkpoint`` is wrapped so that the input counts from the block's forward until
    backward has passed that block."""

    def __init__(self, params):
        self.params = list(params)
        self.live: dict[int, list] = {}  # storage key -> [refcount, nbytes]
        self.now = self.peak = 0

    def _hold(self, t) -> int | None:
        key = t.untyped_storage().data_ptr()
        if key in {p.untyped_storage().data_ptr() for p in self.params}:  # a weight or a view of one
            return None
        entry = self.live.setdefault(key, [0, t.untyped_storage().nbytes()])
        if entry[0] == 0:
            self.now += entry[1]
            self.peak = max(self.peak, self.now)
        entry[0] += 1
        return key

    def _release(self, key):
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.live[key]

    def pack(self, t):
        key = self._hold(t)
        if key is None:
            return t
        holder = _Holder(t)
        weakref.finalize(holder, self._release, key)
        return holder

    @staticmethod
    def unpack(value):
        return value.t if isinstance(value, _Holder) else value

    def _checkpoint(self, original):
        def checkpoint(function, x, *args):
            out = original(function, x, *args)
            key = self._hold(x)
            if key is not None:
                out.grad_fn.register_hook(lambda *grads: self._release(key))
            return out

        return checkpoint

    @contextlib.contextmanager
    def hooks(self):
        import deepspeed

        original = deepspeed.checkpointing.checkpoint
        deepspeed.checkpointing.checkpoint = self._checkpoint(original)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            deepspeed.checkpointing.checkpoint = original


class _Holder:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def _flat(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flat(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _flat(v)


def _distinct(tensors, seen: dict | None = None) -> int:
    """Bytes of the storages behind ``tensors``, each counted once (a view keeps its whole storage
    alive; a storage in ``seen`` adds nothing); ``seen`` (storage pointer -> bytes) is updated."""
    seen = {} if seen is None else seen
    added = 0
    for t in _flat(list(tensors)):
        storage = t.untyped_storage()
        if storage.nbytes() and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = storage.nbytes()
            added += storage.nbytes()
    return added


def _state_bytes(opt, stage: int) -> dict:
    """Bytes of the flat buffers DeepSpeed's ZeRO optimizer holds after a step (names as in DeepSpeed
    0.19.8), each region counted once (ZeRO-3 in fp32 keeps one partition as working and master copy)."""
    seen: dict = {}
    moments = [[s.get("exp_avg"), s.get("exp_avg_sq")] for s in opt.optimizer.state.values()]
    if stage == 3:
        return {
            "weights_16bit": _distinct(opt.fp16_partitioned_groups_flat, seen),
            "persistent_16bit": _distinct((p.data for p in opt.persistent_parameters), seen),
            "weights_fp32": _distinct(opt.fp32_partitioned_groups_flat, seen),
            "optimizer_states": _distinct(moments, seen),
        }
    return {
        "weights_16bit": _distinct(opt.bit16_groups_flat, seen),
        "weights_fp32": _distinct(opt.single_partition_of_fp32_groups, seen),
        "optimizer_states": _distinct(moments, seen),
    }


def main(spec: dict, out_dir: str) -> None:
    from dalle_ds import DALLE, DalleConfig
    from dalle_ds.distributed import ds_adapter
    from dalle_ds.distributed.ds_config import prepare_ds_config
    from dalle_ds.distributed.powersgd import build_comm_hook
    from dalle_ds.distributed.process_group import init_distributed
    from dalle_ds.training.optim import param_groups

    # A fixed mmap threshold (glibc's M_MMAP_THRESHOLD, -3): every tensor above 64 KiB gets its own
    # mapping, returned to the system when freed, so the RSS follows the live tensors (as a GPU's
    # allocated bytes do) instead of keeping freed blocks on the heap.
    ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    rss_baseline, rss_file_baseline = _rss("VmRSS"), _rss("RssFile")
    _install_recorder()
    init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    A, B = spec["grad_accum"], spec["micro_batch"]
    ds = prepare_ds_config(spec["ds"], world_size=world, micro_batch_size=B, gradient_accumulation_steps=A)
    config = DalleConfig.from_name(spec["preset"], **spec.get("overrides", {}))
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    torch.manual_seed(0)
    if stage == 3:
        with ds_adapter.zero3_init(ds):
            model = DALLE(config, initialise=False)
        model.init_weights(around=lambda m: ds_adapter.gathered(list(m.parameters(recurse=False)), modifier_rank=0))
        for param in model.external_parameters():
            ds_adapter.register_external_parameter(model, param)
    else:
        model = DALLE(config)
    ds_adapter.apply_activation_checkpointing(model.blocks, ds)
    opt = torch.optim.AdamW(param_groups(model, 0.045), lr=1e-4, betas=(0.9, 0.96))
    engine, zero_opt, _ = ds_adapter.build_engine(model, ds, opt)
    if spec["ds"].get("communication_hook"):
        os.environ["LOCAL_SIZE"] = str(spec.get("local_size", world))  # the faked node size
        ds_adapter.attach_comm_hook(engine, build_comm_hook(spec["ds"]["communication_hook"]))
    rss_built, rss_build_peak = _rss("VmRSS"), _rss("VmHWM")
    with open("/proc/self/clear_refs", "w") as f:  # training's peak from here on
        f.write("5")
    grads = {"at_reduce": 0, "at_step": 0, "ipg_bucket": 0}

    def gradient_storages(*extra) -> int:
        """Gradient bytes held outside the reduce buckets: the model's .grad (and ZeRO-1's
        .grad_accum), the reduced partitions and ``extra``."""
        seen: dict = {}
        _distinct([b.buffer for b in zero_opt.ipg_buckets.values()], seen)
        partitions = [zero_opt.grad_partitions_flat_buffer] if stage == 3 else zero_opt.averaged_gradients
        held = _distinct([partitions, getattr(zero_opt, "grads_in_partition", None)], seen)
        params = list(engine.module.parameters())
        held += _distinct((p.grad for p in params), seen)
        held += _distinct((getattr(p, "grad_accum", None) for p in params), seen)
        return held + _distinct(extra, seen)

    def before_inner_step(optimizer, args, kwargs):
        fp32 = [p.grad for g in optimizer.param_groups for p in g["params"]]
        grads["at_step"] = max(grads["at_step"], gradient_storages(fp32))

    zero_opt.optimizer.register_step_pre_hook(before_inner_step)
    reduce_name = "_DeepSpeedZeroOptimizer_Stage3__reduce_and_partition_ipg_grads" if stage == 3 else "reduce_ipg_grads"
    reduce = getattr(zero_opt, reduce_name)

    def measuring_reduce(*args, **kwargs):  # as a bucket's reduction starts and ends
        grads["ipg_bucket"] = max(grads["ipg_bucket"], _distinct([b.buffer for b in zero_opt.ipg_buckets.values()]))
        grads["at_reduce"] = max(grads["at_reduce"], gradient_storages())
        out = reduce(*args, **kwargs)
        grads["at_reduce"] = max(grads["at_reduce"], gradient_storages())
        return out

    setattr(zero_opt, reduce_name, measuring_reduce)
    g = torch.Generator().manual_seed(rank)
    saved = SavedBytes(engine.module.parameters())
    for step in range(2):
        for micro in range(A):
            text = torch.randint(1, config.text_vocab_size, (B, config.text_len), generator=g)
            codes = torch.randint(0, config.image_vocab_size, (B, config.image_len), generator=g)
            measure = step == 1 and micro == 0
            with saved.hooks() if measure else contextlib.nullcontext():
                loss = engine(text.to(engine.device), codes.to(engine.device)).loss
                ds_adapter.backward(engine, loss)
            engine.step()
        RECORD["on"] = step == 0
    result = {
        "world": world,
        "stage": stage,
        "states": _state_bytes(zero_opt, stage),
        "gradients": grads,
        "saved": saved.peak,
        # ZeRO-3's F.linear replacement (installed by the first zero.Init of a process, when it finds
        # torch's own linear there) saves the head's input differently: which one ran
        "zero3_linear": torch.nn.functional.linear.__name__ != "linear",
        "collectives": RECORD["calls"],
        "rss_baseline": rss_baseline,
        "rss_built": rss_built,
        "rss_build_peak": rss_build_peak,
        "rss_peak": _rss("VmHWM"),
        "rss_file_baseline": rss_file_baseline,
        "rss_file_end": _rss("RssFile"),
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    main(json.loads(args[0]), args[1])
