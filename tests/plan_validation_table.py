"""Print the dry run's predictions beside the measured runs of tests/test_plan_validation.py as a
Markdown table (component, predicted bytes, measured bytes, predicted / measured), rank 0 of each
run: ``python tests/plan_validation_table.py`` (about 30 s on 2 CPU cores)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def rows():
    import test_plan_validation as t

    from dalle_ds import DalleConfig
    from dalle_ds.planning.layout import Layout
    from dalle_ds.planning.model_shape import trace_activations
    from dalle_ds.planning.plan import plan_run

    for name in t.RUNS:
        plan, rank = t.planned(name), t.measured(name)[0]
        c, states, grads = plan.components, rank["states"], rank["gradients"]
        config = DalleConfig.from_name("dalle-tiny", **t.RUNS[name][4])
        trace = trace_activations(config, t.MICRO_BATCH, plan.engine.torch_dtype, "cpu")
        head = 0 if plan.engine.checkpointing else trace.head
        yield name, "weights_16bit", c["weights_16bit"], states["weights_16bit"] + states.get("persistent_16bit", 0)
        yield name, "weights_fp32", c["weights_fp32"], states["weights_fp32"]
        yield name, "optimizer_states", c["optimizer_states"], states["optimizer_states"]
        yield name, "comm_buckets", c["comm_buckets"], grads["ipg_bucket"]
        yield name, "gradients (backward)", plan.phases["gradients_backward"], grads["at_reduce"]
        yield name, "gradients (step)", plan.phases["gradients_step"], grads["at_step"]
        yield name, "activations" + ("" if head == 0 else " + head"), c["activations"] + head, rank["saved"]
        yield name, "collective bytes / step", sum(x.payload * x.count for x in plan.collectives), sum(
            t._recorded(rank).values()
        )
    for name in t.HOOK_RUNS:
        plan, ranks = t.hook_run(name)
        yield name, "collective bytes / step", sum(x.payload * x.count for x in plan.collectives), sum(
            t._recorded(ranks[0]).values()
        )
        if plan.layout.nodes > 1:
            intra, inter = t._ring_split(ranks[0]["collectives"], plan.layout.gpus_per_node)
            yield name, "inter-node bytes sent / step", plan.inter_node_bytes_per_step, round(inter)
    for stage in (1, 2):
        spec = {**t.RSS_RUN, "ds": {"zero_optimization": {**t.RSS_RUN["ds"]["zero_optimization"], "stage": stage}}}
        config = DalleConfig.from_name(spec["preset"], **spec["overrides"])
        layout = Layout(1, 2, 10**10, spec["micro_batch"], spec["grad_accum"])
        plan = plan_run(config, spec["ds"], layout, device_type="cpu")
        rank = t.probe(spec, 2)[0]
        yield f"zero{stage}_fp32_2ranks_25M", "total vs peak memory growth", plan.total_bytes, t.memory_growth(rank)


def main():
    print("| run | component | predicted | measured | ratio |\n|---|---|---:|---:|---:|")
    for name, component, predicted, measured in rows():
        ratio = f"{predicted / measured:.3f}" if measured else "-"
        print(f"| {name} | {component} | {predicted} | {measured} | {ratio} |")


if __name__ == "__main__":
    main()
