"""DeepSpeed's own estimates of the model states a GPU holds (a cross-check for the dry run)."""

from __future__ import annotations


def estimate_model_states(
    stage: int, params: int, largest_layer: int, gpus_per_node: int, nodes: int, offload_optimizer: bool,
    offload_param: bool,
) -> int | None:
    """GPU bytes DeepSpeed's ``estimate_zero{2,3}_model_states_mem_needs`` give (no buffer factor on
    the GPU side); None for stages 0 and 1, which DeepSpeed has no estimator for."""
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, offload_optimizer)[1]
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        return estimate_zero3_model_states_mem_needs(
            params, largest_layer, gpus_per_node, nodes, offload_optimizer, offload_param, True
        )[1]
    return None
