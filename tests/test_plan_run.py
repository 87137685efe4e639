"""scripts/plan_run.py: its command line, JSON, refusals and the cross-checks that need no run.

What the plan predicts is compared with measured runs in tests/test_plan_validation.py.
"""

import json
import resource
import subprocess
import sys

import pytest
import torch
from conftest import ROOT as REPO
from conftest import script_result

from dalle_ds import load_config
from dalle_ds.distributed.ds_config import load_ds_config
from dalle_ds.planning.layout import Layout, PlanError, parse_bytes
from dalle_ds.planning.model_shape import trace_activations
from dalle_ds.planning.plan import plan_run
from dalle_ds.planning.traffic import Collective, bytes_sent

REQUIRED = {"fits", "total_bytes", "components", "host_bytes_at_start",
            "intra_node_bytes_per_step", "inter_node_bytes_per_step"}


def _json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_json_last_line_has_the_documented_keys():
    code, out, err = script_result(
        "plan_run.py", "--preset", "dalle-1.3b", "--deepspeed_config", "ds_configs/zero2_fp16_powersgd.json",
        "--nodes", "2", "--gpus-per-node", "8", "--gpu-memory", "80GB", "--micro-batch-size", "2", "--json",
    )  # fmt: skip
    assert code == 0, err
    plan = _json(out)
    assert REQUIRED <= set(plan)
    assert isinstance(plan["fits"], bool)
    assert any("powersgd" in name for name in plan["components"])
    assert plan["total_bytes"] <= sum(plan["components"].values())
    assert plan["largest"] == max(plan["components"], key=plan["components"].get)
    assert plan["largest"] in out.split("{")[0]  # the text names the largest term
    assert plan["global_batch"] == 2 * 16 and plan["inter_node_bytes_per_step"] > 0


@pytest.mark.parametrize(
    "args, names",
    [
        (["--nodes", "0"], "--nodes"),
        (["--gpus-per-node", "-1"], "--gpus-per-node"),
        (["--gpu-memory", "lots"], "--gpu-memory"),
        (["--micro-batch-size", "0"], "--micro-batch-size"),
        (["--preset", "dvae-paper"], "DVAEConfig"),
        (["--dvae", "dvae-tiny"], "grid"),
    ],
)
def test_impossible_layouts_are_refused_naming_the_setting(args, names):
    base = ["--preset", "dalle-1.3b", "--deepspeed_config", "ds_configs/zero2_bf16.json"]
    code, out, err = script_result("plan_run.py", *base, *args)
    assert code == 2 and names in err, err


def test_inconsistent_batch_and_offload_settings_are_refused(tmp_path):
    ds = load_ds_config(REPO / "ds_configs/zero2_bf16.json")
    config = load_config("dalle-1.3b")
    fixed = {**ds, "train_batch_size": 100}
    with pytest.raises(PlanError, match="train_batch_size=100"):
        plan_run(config, fixed, Layout(1, 8, parse_bytes("80GB"), 1))
    offload = {**ds, "zero_optimization": {**ds["zero_optimization"], "offload_param": {"device": "cpu"}}}
    with pytest.raises(PlanError, match="offload_param needs stage 3"):
        plan_run(config, offload, Layout(1, 8, parse_bytes("80GB"), 1))
    hook = load_ds_config(REPO / "ds_configs/zero2_fp16_powersgd.json")
    zero3 = {**hook, "zero_optimization": {"stage": 3}}
    with pytest.raises(PlanError, match="stage=3"):
        plan_run(config, zero3, Layout(2, 8, parse_bytes("80GB"), 1))
    # bf16 at ZeRO-1: DeepSpeed's ZeRO optimizer (buckets to hook) unless gradients accumulate in fp32,
    # when it picks BF16_Optimizer
    zero1 = {**hook, "fp16": {"enabled": False}, "bf16": {"enabled": True},
             "zero_optimization": {**hook["zero_optimization"], "stage": 1}}  # fmt: skip
    assert plan_run(config, zero1, Layout(2, 8, parse_bytes("80GB"), 1)).engine.stage == 1
    with pytest.raises(PlanError, match="grad_accum_dtype"):
        plan_run(config, {**zero1, "data_types": {"grad_accum_dtype": "fp32"}}, Layout(2, 8, parse_bytes("80GB"), 1))


def test_sizes_parse_in_decimal_and_binary_units():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("16GiB") == 16 * 2**30
    assert parse_bytes("16g") == 16 * 10**9
    assert parse_bytes(1234) == 1234


def test_12b_is_planned_on_the_meta_device_without_allocating_weights():
    """dalle-12b holds 48 GB of fp32 weights; the dry run's whole process stays far below that."""
    code = (
        "import resource, sys; from dalle_ds.planning.cli import main; "
        "rc = main(['--preset', 'dalle-12b', '--deepspeed_config', 'ds_configs/zero3_bf16.json', '--nodes', '16']); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    peak_kib = int(done.stdout.strip().splitlines()[-1])
    assert peak_kib < 2 * 2**20, f"peak RSS {peak_kib / 2**20:.1f} GiB"  # under 2 GiB
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss > 0


def test_zero2_model_states_agree_with_deepspeeds_estimator():
    """ZeRO-2 model states (no offload) equal DeepSpeed's estimate_zero2_model_states_mem_needs
    (2 + 18 / W bytes per parameter: the gradients at the step are the 16-bit partition and its fp32
    copy), up to the padding of each optimizer group to a multiple of 2 W."""
    config = load_config("dalle-2.8b")
    plan = plan_run(config, load_ds_config(REPO / "ds_configs/zero2_bf16.json"), Layout(16, 8, 80 * 10**9, 1))
    states = sum(plan.components[k] for k in ("weights_16bit", "weights_fp32", "gradients", "optimizer_states"))
    assert abs(states - plan.deepspeed_estimate) <= 18 * 2 * 128 * 2, (states, plan.deepspeed_estimate)


def test_hierarchical_powersgd_on_one_node_compresses_nothing_and_says_so():
    config = load_config("dalle-1.3b")
    ds = load_ds_config(REPO / "ds_configs/zero2_fp16_powersgd.json")
    one = plan_run(config, ds, Layout(1, 8, 80 * 10**9, 1))
    assert one.components["powersgd_state"] == 0 and any("one node" in n for n in one.notes)
    assert one.inter_node_bytes_per_step == 0
    two = plan_run(config, ds, Layout(2, 8, 80 * 10**9, 1))
    assert two.components["powersgd_state"] > 0
    assert two.inter_node_bytes_per_step < 0.5 * two.inter_node_bytes_without_hook


def test_activation_checkpointing_keeps_block_inputs_only():
    config = load_config("dalle-tiny")
    trace = trace_activations(config, 2, torch.float32, "cpu")
    d, n = config.d_model, config.text_len + config.image_len
    assert trace.block_inputs == (2 * n * d * 4,) * config.n_layers
    assert trace.checkpointed_peak() < trace.total
    ds = load_ds_config(REPO / "ds_configs/zero3_bf16.json")  # ships with activation checkpointing
    plain = {k: v for k, v in ds.items() if k != "activation_checkpointing"}
    layout = Layout(1, 8, 80 * 10**9, 4)
    on = plan_run(load_config("dalle-1.3b"), ds, layout).components["activations"]
    off = plan_run(load_config("dalle-1.3b"), plain, layout).components["activations"]
    assert on < off / 5


def test_ring_bytes_split_intra_and_inter_node():
    """An all-reduce of S over 2 nodes x 4 GPUs: 2 (8-1)/8 S per rank, a quarter of it across nodes;
    a node-local group never crosses; a one-rank-per-node group always does."""
    S = 8 * 2**20
    intra, inter = bytes_sent([Collective("all_reduce", "world", S)], 2, 4)
    assert intra + inter == int(2 * 7 / 8 * S) and inter == int(2 * 7 / 8 * S / 4)
    assert bytes_sent([Collective("all_gather", "intra", S)], 2, 4) == (int(3 / 4 * S), 0)
    assert bytes_sent([Collective("all_reduce", "inter", S)], 2, 4) == (0, int(S))
    assert bytes_sent([Collective("all_reduce", "world", S)], 1, 1) == (0, 0)


def test_docs_planning_holds_the_current_tables():
    """docs/planning.md's tables are what the planner prints today (python -m dalle_ds.planning.tables --write)."""
    from dalle_ds.planning.tables import render

    assert render(REPO) in (REPO / "docs" / "planning.md").read_text()
