"""Bytes a rank sends per optimizer step: the collectives DeepSpeed and the PowerSGD hook issue.

A plan lists :class:`Collective` records (op, group, payload) per optimizer step, the same records
a recording process group sees in a real run (tests compare them). Payload follows torch's
arguments: an all-reduce's tensor, a reduce-scatter's full input, an all-gather's full output.
:func:`bytes_sent` turns payloads into the bytes one rank puts on the wire under a ring algorithm
(NCCL's default for large messages): ``2 (k-1)/k`` of the payload for an all-reduce over ``k``
ranks, ``(k-1)/k`` for a reduce-scatter or all-gather. A group inside one node sends over the node's
links (NVLink); a group spanning ``n`` nodes with ``g`` of its ranks per node crosses nodes on
``n`` of the ring's ``k`` hops, so on average ``1/g`` of a rank's ring bytes are inter-node (each of
a node's GPUs drives its own NIC: NCCL runs one ring per NIC).
"""

from __future__ import annotations

import dataclasses

__all__ = ["Collective", "bytes_sent"]

RING_FACTOR = {"all_reduce": 2.0, "reduce_scatter": 1.0, "all_gather": 1.0, "broadcast": 1.0}


@dataclasses.dataclass(frozen=True)
class Collective:
    op: str  # all_reduce, reduce_scatter, all_gather, broadcast
    group: str  # 'world', 'intra' (the ranks of one node) or 'inter' (one rank per node)
    payload: int  # bytes, as torch's argument sizes (see the module doc)
    count: int = 1  # how many such calls per optimizer step
    what: str = ""

    def group_size(self, nodes: int, gpus_per_node: int) -> int:
        return {"world": nodes * gpus_per_node, "intra": gpus_per_node, "inter": nodes}[self.group]

    def spans_nodes(self, nodes: int, gpus_per_node: int) -> bool:
        return self.group == "inter" and nodes > 1 or self.group == "world" and nodes > 1


def bytes_sent(collectives: list[Collective], nodes: int, gpus_per_node: int) -> tuple[int, int]:
    """(intra-node, inter-node) bytes one rank sends per optimizer step under a ring algorithm."""
    intra = inter = 0.0
    for c in collectives:
        k = c.group_size(nodes, gpus_per_node)
        if k <= 1:
            continue
        ring = RING_FACTOR[c.op] * (k - 1) / k * c.payload * c.count
        if not c.spans_nodes(nodes, gpus_per_node):
            intra += ring
            continue
        per_node = k // nodes  # ranks of the group on each node
        inter += ring / per_node
        intra += ring - ring / per_node
    return int(intra), int(inter)
