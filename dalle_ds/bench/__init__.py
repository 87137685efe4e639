"""What the benchmarks in ``scripts/bench_*.py`` measure, importable and tested at toy sizes
(``tests/test_bench_*.py``); the scripts parse arguments and print tables.

- ``attention``: one attention op (block-sparse, dense, causal SDPA), time and peak memory;
- ``data``: the streaming data pipeline against raw JPEG decoding;
- ``grad_scaling``: fp16 gradient fidelity, one loss scale vs per-resblock scales;
- ``powersgd``: the PowerSGD hook's bytes and compression time at the paper's layer shapes;
- ``sample``: sampling speed and KV-cache memory of every cache mode;
- ``train``: training throughput and memory per ZeRO stage under the launcher.

Nothing else in dalle_ds imports this package.
"""
