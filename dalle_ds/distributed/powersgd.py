"""PowerSGD gradient compression as a DeepSpeed communication hook (paper App. E).

Switched on by a ``communication_hook`` section of the DeepSpeed JSON (stripped before DeepSpeed
sees the config), e.g.::

    "communication_hook": {"type": "powersgd", "rank": 4, "start_iter": 10, "min_compression_rate": 2,
                           "error_feedback": true, "warm_start": false, "orthogonalization": "householder",
                           "dtype": "fp16", "error_dtype": "auto", "hierarchical": true}

Per weight matrix M (n x m) with rank r: P = M Q, all-reduce P, orthogonalise P, Q = M^T P,
all-reduce Q, M ~= P Q^T / world, with error feedback (the residual joins the next step's gradient;
it is stored in ``error_dtype``, 16 bits by default under bf16/fp16). The math runs one matrix at a
time in fp32, recomputing M = gradient + residual in each of its three passes instead of keeping it.
Vectors (biases, gains), embeddings and matrices too small to gain go through one plain fp32
all-reduce. ``warm_start: true`` starts each step's power iteration from the previous Q; ``false``
is the paper's variant: one random Q per matrix, drawn once and kept. ``hierarchical`` reduces
exactly inside a node and compresses only across nodes (on one node: an exact all-reduce).

This module sees gradient tensors and process groups only: ``reduce(named_grads, scale)`` averages
them over the data-parallel group in place. Plugging it into a DeepSpeed engine (which has no hook
API) is :func:`dalle_ds.distributed.ds_adapter.attach_comm_hook`'s job.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import collectives as dd
from .errors import CommHookError
from .powersgd_ops import as_rows, orthogonalize, pack, scatter_back, views

__all__ = [
    "COMM_HOOKS",
    "CommHookError",
    "PowerSGD",
    "PowerSGDConfig",
    "build_comm_hook",
    "register_comm_hook",
]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PowerSGDConfig:
    rank: int = 4
    """Rank r of each matrix's approximation (per node-level shard in hierarchical mode)."""
    start_iter: int = 10
    """Plain all-reduce for this many steps first (PowerSGD needs a warmed-up model)."""
    min_compression_rate: float = 2.0
    """Compress a matrix only if n m / ((n + m) r) exceeds this."""
    error_feedback: bool = True
    """Carry each matrix's compression residual into the next step."""
    warm_start: bool = True
    """Reuse last step's Q (True) or keep one random Q per matrix forever (False, the paper's)."""
    orthogonalization: str = "gram_schmidt"
    """'gram_schmidt' (PyTorch's hook for r <= 2) or 'householder' (QR)."""
    epsilon: float = 0.0
    """Added to column norms in Gram-Schmidt (guards all-zero columns)."""
    dtype: str = "fp32"
    """Wire type of P and Q: fp32, fp16 or bf16 (the paper sends 16 bits)."""
    error_dtype: str = "auto"
    """Storage of the residuals: 'auto' (bf16 when the engine trains in bf16/fp16, else fp32), fp32, fp16, bf16."""
    hierarchical: bool = False
    """Exact reduce within a node, PowerSGD only across nodes."""
    exact: bool = False
    """Never compress: our plain all-reduce only (a guard test against DeepSpeed's own reduction)."""
    seed: int = 0
    """Seed of the random Q's."""

    def __post_init__(self):
        def need(ok, key, why):
            if not ok:
                raise CommHookError(f"communication_hook.{key}={getattr(self, key)!r}: {why}")

        need(isinstance(self.rank, int) and self.rank >= 1, "rank", "must be a positive integer")
        need(isinstance(self.start_iter, int) and self.start_iter >= 0, "start_iter", "must be >= 0")
        need(self.min_compression_rate >= 1, "min_compression_rate", "must be >= 1")
        need(
            self.orthogonalization in ("gram_schmidt", "householder"),
            "orthogonalization",
            "must be 'gram_schmidt' or 'householder'",
        )
        need(self.dtype in _DTYPES, "dtype", f"must be one of {sorted(_DTYPES)}")
        need(self.error_dtype in ("auto", *_DTYPES), "error_dtype", f"must be 'auto' or one of {sorted(_DTYPES)}")
        need(self.epsilon >= 0, "epsilon", "must be >= 0")

    @classmethod
    def from_section(cls, section: dict[str, Any]) -> PowerSGDConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - known - {"type"})
        if unknown:
            raise CommHookError(
                f"communication_hook: unknown key(s) {unknown} for type 'powersgd'; known: {sorted(known)}"
            )
        return cls(**{k: v for k, v in section.items() if k != "type"})


class PowerSGD:
    """Averages gradients across a process group, compressing weight matrices (see module doc).

    ``reduce(named_grads)`` takes (key, gradient) pairs and overwrites each gradient with the group
    average (exact for uncompressed tensors, rank-r for compressed ones). Keys identify parameters
    across steps (error feedback, Q). ``bytes_sent`` / ``bytes_plain`` count this rank's payload
    per reduce against what a plain fp32 all-reduce of the same tensors would send;
    ``bytes_by_kind`` splits ``bytes_sent`` into the plain fp32 part and P and Q.
    """

    def __init__(self, config: PowerSGDConfig, group=None, intra_group=None):
        self.config = config
        self.group = group  # across which PowerSGD runs (inter-node group in hierarchical mode)
        self.intra_group = intra_group  # exact pre-reduce (hierarchical mode)
        # Whether the engine skips a step whose gradients are not finite (fp16 with loss scaling).
        # Then this step's residuals and warm-start Q's are staged and step(skipped=...) commits or
        # drops them (one extra copy of the compressed matrices' residuals while a step runs);
        # otherwise residuals are updated in place and a non-finite step is an error.
        self.skips_non_finite = False
        self.train_dtype = torch.float32  # the engine's precision (attach_comm_hook): error_dtype "auto"
        self.errors: dict[Any, torch.Tensor] = {}  # unscaled residuals (true-gradient units), error_dtype
        self.qs: dict[Any, torch.Tensor] = {}
        self._pending_errors: dict[Any, torch.Tensor] = {}
        self._pending_qs: dict[Any, torch.Tensor] = {}
        self._finite: torch.Tensor | None = None  # on the device: no host sync until step()
        self._scale = 1.0  # the loss scale of the gradients being reduced (reduce's ``scale``)
        self.iter = 0
        self.skipped = 0  # steps the engine skipped (fp16 overflow): nothing of them was kept
        self.bytes_sent = 0
        self.bytes_plain = 0
        self.bytes_by_kind = {"plain": 0, "P": 0, "Q": 0}
        self.last_step_bytes = (0, 0)
        self._generator = torch.Generator().manual_seed(config.seed)

    @property
    def error_dtype(self) -> torch.dtype:
        """The residuals' storage dtype: ``error_dtype``, with "auto" resolved by ``train_dtype``."""
        if self.config.error_dtype != "auto":
            return _DTYPES[self.config.error_dtype]
        return torch.float32 if self.train_dtype == torch.float32 else torch.bfloat16

    # -- state for checkpoints --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:  # the residuals themselves: later steps update them in place
        return {
            "iter": self.iter,
            "skipped": self.skipped,
            "errors": dict(self.errors),
            "qs": dict(self.qs),
            "generator": self._generator.get_state(),
            "bytes_sent": self.bytes_sent,
            "bytes_plain": self.bytes_plain,
            "bytes_by_kind": dict(self.bytes_by_kind),
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | str | None = None, buffers=True) -> None:
        """Restore :meth:`state_dict`; residuals and Q's go to ``device`` (the gradients' device), cast to
        :attr:`error_dtype`. ``buffers=False`` (another number of ranks): they start afresh, the schedule stays."""
        self.iter, self.bytes_sent, self.bytes_plain = state["iter"], state["bytes_sent"], state["bytes_plain"]
        self.bytes_by_kind = dict(state.get("bytes_by_kind", {"plain": 0, "P": 0, "Q": 0}))
        errors, qs = (state["errors"], state["qs"]) if buffers else ({}, {})
        self.errors = {k: v.to(device=device, dtype=self.error_dtype, copy=True) for k, v in errors.items()}
        self.qs = {k: v.to(device) if device is not None else v for k, v in qs.items()}
        self.skipped = state.get("skipped", 0)
        self._pending_errors, self._pending_qs = {}, {}
        self._generator.set_state(state["generator"])

    # -- the reduction ------------------------------------------------------------------------
    def _rank(self, n: int, m: int) -> int:
        return min(n, m, self.config.rank)

    def _compressible(self, g: torch.Tensor) -> bool:
        if g.ndim < 2:
            return False
        n, m = g.shape[0], math.prod(g.shape[1:])
        r = self._rank(n, m)
        return (n + m) * r * self.config.min_compression_rate < n * m

    def _all_reduce_mean(self, flat: torch.Tensor, group) -> None:
        dd.all_reduce(flat, group=group)
        flat.mul_(1.0 / dd.world_size(group))  # as DeepSpeed scales: bit-identical in exact mode

    def reduce(self, named_grads: list[tuple[Any, torch.Tensor]], scale: float = 1.0) -> None:
        """Average ``named_grads`` in place. ``scale``: the fp16 loss scale the gradients carry.

        Residuals are stored in true gradient units and brought to each step's scale, so a
        loss-scale change between steps does not change the applied update. A non-finite input (an
        fp16 overflow) is not an error: it reaches the output, where the engine's overflow check
        skips the step, and :meth:`step` with ``skipped=True`` drops what this step computed."""
        self._scale = float(scale)
        before = sum(self.bytes_by_kind.values())
        if self.intra_group is not None:
            self._reduce_hierarchical(named_grads)
        else:
            self._reduce_across(named_grads)
        sent = sum(self.bytes_by_kind.values()) - before
        total = sum(g.numel() for _, g in named_grads) * 4  # a plain fp32 all-reduce's payload
        self.bytes_sent += sent
        self.bytes_plain += total
        self.last_step_bytes = (sent, total)

    def _reduce_across(self, named_grads: list[tuple[Any, torch.Tensor]]) -> None:
        """Average over ``self.group``, compressing what pays; counts the bytes this rank sends."""
        cfg = self.config
        compress = not cfg.exact and self.iter >= cfg.start_iter
        plain = [g for _, g in named_grads if not (compress and self._compressible(g))]
        matrices = [(k, g) for k, g in named_grads if compress and self._compressible(g)]
        if matrices:  # first: the plain part's fp32 copy is not alive meanwhile
            self._powersgd(matrices)
        if plain:
            flat = torch.cat([g.reshape(-1).float() for g in plain])
            self._all_reduce_mean(flat, self.group)
            scatter_back(flat, plain)
            self.bytes_by_kind["plain"] += flat.numel() * 4

    def _reduce_hierarchical(self, named_grads: list[tuple[Any, torch.Tensor]]) -> None:
        """The paper's layout: reduce-scatter inside the node, PowerSGD across nodes, all-gather.

        Local rank j owns row-shard j of every tensor: it receives the node's average of that
        shard, averages it with its peers (local rank j of every node) through ``_reduce_across``,
        and the node all-gathers the shards back. Only ``_reduce_across`` crosses nodes: that is
        the traffic counted.
        """
        local = dd.world_size(self.intra_group)
        me = dd.rank(self.intra_group)
        # shards[t][j]: rows of tensor t that local rank j owns (1-D tensors split as vectors)
        shards = [as_rows(g).tensor_split(local) for _, g in named_grads]
        sizes = [sum(s[j].numel() for s in shards) for j in range(local)]
        width = max(sizes)
        send = torch.zeros(local * width, dtype=torch.float32, device=named_grads[0][1].device)
        for j in range(local):
            pack([s[j] for s in shards], send[j * width : j * width + sizes[j]])
        mine = torch.empty(width, dtype=torch.float32, device=send.device)
        dd.reduce_scatter(mine, send, self.intra_group)
        mine.mul_(1.0 / local)
        views, offset = [], 0
        for (key, _), s in zip(named_grads, shards, strict=True):
            views.append(((key, me), mine[offset : offset + s[me].numel()].view(s[me].shape)))
            offset += s[me].numel()
        self._reduce_across(views)  # writes the cross-node average into `mine`
        gathered = send  # the node's input is reduced: its buffer receives the gathered shards
        dd.all_gather_into(gathered, mine, self.intra_group)
        offsets = [j * width for j in range(local)]
        for (_, g), s in zip(named_grads, shards, strict=True):
            parts = []
            for j in range(local):
                parts.append(gathered[offsets[j] : offsets[j] + s[j].numel()])
                offsets[j] += s[j].numel()
            g.copy_(torch.cat(parts).view(g.shape))

    def _powersgd(self, matrices: list[tuple[Any, torch.Tensor]]) -> None:
        """P and Q of every matrix go in one all-reduce each; everything of size n x m is made and
        dropped one matrix at a time: M (fp32) three times over, then the approximation."""
        cfg = self.config
        wire = _DTYPES[cfg.dtype]
        device = matrices[0][1].device
        by_shape: dict[tuple, list[tuple[Any, torch.Tensor]]] = defaultdict(list)
        for key, g in matrices:
            by_shape[(g.shape[0], g[0].numel())].append((key, g))
        sizes = [(len(items), n, m, self._rank(n, m)) for (n, m), items in by_shape.items()]
        p_flat = torch.empty(sum(b * n * r for b, n, _, r in sizes), device=device)
        q_flat = torch.empty(sum(b * m * r for b, _, m, r in sizes), device=device)
        ps = views(p_flat, [(b, n, r) for b, n, _, r in sizes])
        qs = views(q_flat, [(b, m, r) for b, _, m, r in sizes])
        groups = list(zip(by_shape.values(), ps, qs, strict=True))
        for items, p, _ in groups:  # P = M Q, from this step's starting Q
            keys, m, r = [k for k, _ in items], items[0][1][0].numel(), p.shape[2]
            fresh = [k for k in keys if k not in self.qs]
            for k in fresh:
                self.qs[k] = torch.randn(m, r, generator=self._generator).to(device)
            q_in = torch.stack([self._pending_qs.get(k, self.qs[k]) for k in keys])
            if cfg.warm_start or fresh:
                orthogonalize(q_in, cfg.orthogonalization, cfg.epsilon)
                if not cfg.warm_start:  # the paper's variant: keep the orthogonalised initial Q
                    for i, k in enumerate(keys):
                        self.qs[k] = q_in[i].clone()
            for i, (k, g) in enumerate(items):
                torch.mm(self._input(k, g), q_in[i], out=p[i])
        self._all_reduce_sum_wire(p_flat, wire)  # non-finite P (an fp16 overflow) stays so to the output
        for items, p, q in groups:  # Q = M^T P, with P orthogonalised
            orthogonalize(p, cfg.orthogonalization, cfg.epsilon)
            for i, (k, g) in enumerate(items):
                torch.mm(self._input(k, g).T, p[i], out=q[i])
        self._all_reduce_sum_wire(q_flat, wire)
        finite = torch.isfinite(p_flat).all() & torch.isfinite(q_flat).all()  # equal on every rank: reduced
        self._finite = finite if self._finite is None else self._finite & finite
        q_flat.mul_(1.0 / dd.world_size(self.group))
        for items, p, q in groups:  # the average ~= P Q^T; the residual M - P Q^T is kept
            for i, (k, g) in enumerate(items):
                approx = p[i] @ q[i].T
                if cfg.error_feedback:
                    self._keep_error(k, self._input(k, g).sub_(approx).div_(self._scale))
                if cfg.warm_start:
                    self._pending_qs[k] = q[i].clone()
                g.copy_(approx.view(g.shape))
        self.bytes_by_kind["P"] += p_flat.numel() * wire.itemsize  # P and Q travel in the wire dtype
        self.bytes_by_kind["Q"] += q_flat.numel() * wire.itemsize

    def _input(self, key, g: torch.Tensor) -> torch.Tensor:
        """M = the gradient (loss-scaled, so 16-bit P/Q keep the range the loss scale gives them) plus
        its unscaled residual brought to this step's scale: a new fp32 (n, m) tensor with error feedback."""
        rows = g.reshape(g.shape[0], -1)
        if not self.config.error_feedback:
            return rows.float()
        error = self._pending_errors.get(key)  # an earlier reduce of this step (ZeRO-2 micro-batches)
        if error is None:
            error = self.errors.get(key)
        M = rows.to(torch.float32, copy=True)
        return M if error is None else M.add_(error, alpha=self._scale)

    def _keep_error(self, key, residual: torch.Tensor) -> None:
        """Store ``residual`` (fp32, unscaled) as ``key``'s residual in :attr:`error_dtype`: staged
        when the engine may still skip this step, else in place of the last one."""
        store = self._pending_errors if self.skips_non_finite else self.errors
        old = store.get(key)
        if old is not None and old.dtype == self.error_dtype and old.shape == residual.shape:
            old.copy_(residual)
        else:
            store[key] = residual.to(self.error_dtype)

    def _all_reduce_sum_wire(self, flat: torch.Tensor, wire: torch.dtype) -> None:
        """Sum ``flat`` (fp32) over the group in place, sent as ``wire`` (fp16 may overflow to inf)."""
        if wire == flat.dtype:
            dd.all_reduce(flat, group=self.group)
            return
        low = flat.to(wire)
        dd.all_reduce(low, group=self.group)
        flat.copy_(low)

    def step(self, skipped: bool = False) -> None:
        """Call once per optimizer step, after the engine's step (one host sync).

        ``skipped``: the engine did not apply the update (an fp16 overflow). This step's residuals
        and warm-start Q's are then dropped, so the next step starts from the state the last applied
        update left (Q's drawn for matrices seen for the first time are kept: they depend on no
        gradient). With an engine that applies every update (bf16, fp32), non-finite P or Q raise
        ``FloatingPointError`` here: the update already applied was not finite."""
        finite = True if self._finite is None else bool(self._finite)
        self._finite = None
        if skipped or not finite:
            self._pending_errors, self._pending_qs = {}, {}
            if not self.skips_non_finite:
                raise FloatingPointError(
                    f"PowerSGD: non-finite values in the reduced P/Q at step {self.iter}, and the engine "
                    f"applies every update (no fp16 loss scaling); lower the learning rate or check the data"
                )
            self.skipped += 1
            return
        self.errors.update(self._pending_errors)
        self.qs.update(self._pending_qs)
        self._pending_errors, self._pending_qs = {}, {}
        self.iter += 1


# --- registry: "communication_hook" sections to hooks --------------------------------------------

COMM_HOOKS: dict[str, Callable[..., Any]] = {}


def register_comm_hook(name: str, factory: Callable[..., Any]) -> None:
    """Make ``{"communication_hook": {"type": name, ...}}`` build ``factory(section, groups)``."""
    COMM_HOOKS[name] = factory


def _node_size() -> int:
    """Ranks per node: the launcher's local world (LOCAL_SIZE, or torchrun's LOCAL_WORLD_SIZE)."""
    world = dd.world_size()
    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", world)))
    if world % local:
        raise CommHookError(f"hierarchical PowerSGD: world size {world} is not a multiple of the node size {local}")
    return local


def _node_groups(local: int):
    """(intra-node group, inter-node group) of this rank, for nodes of ``local`` ranks."""
    world, rank = dd.world_size(), dd.rank()
    intra = inter = None
    for node in range(world // local):  # every rank must create every group, in the same order
        g = dd.new_group(list(range(node * local, (node + 1) * local)))
        if rank // local == node:
            intra = g
    for lr in range(local):
        g = dd.new_group(list(range(lr, world, local)))
        if rank % local == lr:
            inter = g
    return intra, inter


def _powersgd_factory(section: dict[str, Any]) -> PowerSGD:
    config = PowerSGDConfig.from_section(section)
    if not config.hierarchical:
        return PowerSGD(config)
    local = _node_size()
    if local == dd.world_size():  # one node: every cross-node group would hold one rank, nothing to save
        if dd.rank() == 0:
            print("[dalle-ds] hierarchical PowerSGD on one node: gradients are averaged exactly (no compression)")
        return PowerSGD(dataclasses.replace(config, hierarchical=False, exact=True))
    intra, inter = _node_groups(local)
    return PowerSGD(config, group=inter, intra_group=intra)


register_comm_hook("powersgd", _powersgd_factory)


def build_comm_hook(section: dict[str, Any] | None):
    """The hook a ``communication_hook`` section asks for, or None without one."""
    if not section:
        return None
    if not isinstance(section, dict) or "type" not in section:
        raise CommHookError("communication_hook must be an object with a 'type'")
    kind = section["type"]
    if kind not in COMM_HOOKS:
        raise CommHookError(f"communication_hook.type={kind!r}: unknown; registered: {sorted(COMM_HOOKS)}")
    return COMM_HOOKS[kind](section)
