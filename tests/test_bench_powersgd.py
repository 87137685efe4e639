"""The PowerSGD benchmark (dalle_ds/bench/powersgd.py, scripts/bench_powersgd.py) at dalle-tiny's
shapes: the paper's layout shards every tensor's rows, and the bytes it reports are P and Q in fp16
for the matrices that compress and fp32 for the rest, against 4 bytes per entry uncompressed; the
memory bench divides by the parameters the dry run counts as compressed."""

import torch

from dalle_ds import get_preset
from dalle_ds.bench.powersgd import block_grads, measure_setting, row_shard, settings


def expected_bytes(tensors, rank: int) -> int:
    sent = 0
    for _, g in tensors:
        n, m = g.shape[0], g[0].numel() if g.ndim >= 2 else 1
        r = min(n, m, rank)
        compress = g.ndim >= 2 and (n + m) * r * 2 < n * m  # min_compression_rate 2
        sent += (n + m) * r * 2 if compress else g.numel() * 4
    return sent


def test_bytes_per_setting_are_p_and_q_in_fp16_plus_the_plain_rest(single_process_group):
    config = get_preset("dalle-tiny")
    grads, backward_ms = block_grads(config, blocks=2, batch=1, rounds=1)
    assert backward_ms > 0 and [n for n, _ in grads][:2] == ["0.ln_1.weight", "0.ln_1.bias"]
    rows = settings(grads, gpus_per_node=4, total_rank=16, flat_ranks=[2, 8])
    assert [(name, rank) for name, _, rank in rows] == [("paper: 4 shards x r=4", 4), ("flat r=2", 2), ("flat r=8", 8)]
    paper = dict(rows[0][1])
    for name, g in grads:  # this GPU's quarter of the rows (of a vector: of its entries), rounded up
        assert paper[name].shape[0] == -(-(g.shape[0] if g.ndim >= 2 else g.numel()) // 4), name
    for _, tensors, rank in rows:
        m = measure_setting(tensors, rank, rounds=1)
        numel = sum(g.numel() for _, g in tensors)
        assert m["plain32_mb"] == numel * 4 / 1e6 and m["plain16_mb"] == m["plain32_mb"] / 2
        assert m["sent_mb"] == expected_bytes(tensors, rank) / 1e6 and m["sent_mb"] < m["plain32_mb"]


def test_row_shards_split_the_matrix_rows():
    g = torch.arange(24.0).reshape(6, 2, 2)
    shards = [row_shard(g, 4, i) for i in range(4)]
    assert [s.shape for s in shards] == [(2, 4), (2, 4), (1, 4), (1, 4)]
    assert torch.equal(torch.cat(shards), g.reshape(6, 4))
    assert torch.equal(row_shard(torch.arange(5.0), 2, 1), torch.tensor([3.0, 4.0]))


def test_memory_bench_counts_the_parameters_the_planner_compresses():
    from dalle_ds.bench.powersgd import final_loss, param_counts
    from dalle_ds.distributed.powersgd import PowerSGDConfig
    from dalle_ds.planning.layout import Layout
    from dalle_ds.planning.model_shape import model_shape
    from dalle_ds.planning.powersgd_plan import compressed_matrices

    config, hook = get_preset("dalle-tiny"), PowerSGDConfig(rank=4, min_compression_rate=2)
    total, compressed = param_counts(config, hook)
    shape = model_shape(config)
    layout = Layout(nodes=1, gpus_per_node=2, gpu_memory=2**30, micro_batch=1)
    matrices, plain = compressed_matrices(shape, hook, layout)
    assert total == shape.numel and compressed == sum(n * m for n, m, _ in matrices) == total - plain > 0
    assert final_loss([{"loss": v} for v in (9.0, 1.0, 2.0, 3.0)], last=3) == 2.0
