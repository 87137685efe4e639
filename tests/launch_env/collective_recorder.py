"""Test-only: record the torch.distributed calls that dalle_ds code issues (see sitecustomize.py).

Each call made directly from a dalle_ds source file is appended to
``$DALLE_DS_TEST_RECORD_COLLECTIVES/rank<R>.jsonl`` as
``{"op", "caller" (file:line of the direct caller), "function" (its name), "origin" (the first dalle_ds frame outside
dalle_ds/distributed/collectives.py), "devices" (device types of the tensors passed), "group_devices" (device
types the group's backends accept), "object": bool}``.
"""

import functools
import json
import os
import sys

OPS = (
    "all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
    "reduce_scatter_tensor", "reduce_scatter_single", "all_to_all", "all_to_all_single", "reduce", "gather",
    "scatter", "send", "recv", "isend", "irecv", "barrier", "all_gather_object", "broadcast_object_list",
    "gather_object", "scatter_object_list", "new_group", "monitored_barrier",
)  # fmt: skip
OBJECT_OPS = {"all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list", "barrier"}


def _package_file(filename: str) -> bool:
    return f"{os.sep}dalle_ds{os.sep}" in filename


def _tensors(value):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def install(dist) -> None:
    out_dir = os.environ["DALLE_DS_TEST_RECORD_COLLECTIVES"]

    def record(op, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            caller = sys._getframe(1)
            if _package_file(caller.f_code.co_filename):
                origin = caller
                while origin is not None and origin.f_code.co_filename.endswith(
                    os.path.join("dalle_ds", "distributed", "collectives.py")
                ):
                    origin = origin.f_back
                group = kwargs.get("group")
                if group is None and op not in ("new_group",):
                    group = next((a for a in args if isinstance(a, dist.ProcessGroup)), None)
                try:
                    config = dist.get_backend_config(group)
                    group_devices = sorted({part.split(":")[0] for part in config.split(",")})
                except Exception:  # noqa: BLE001  (not initialised yet)
                    group_devices = []
                entry = {
                    "op": op,
                    "caller": f"{caller.f_code.co_filename}:{caller.f_lineno}",
                    "function": caller.f_code.co_name,
                    "origin": f"{origin.f_code.co_filename}:{origin.f_lineno}" if origin else None,
                    "devices": sorted({t.device.type for a in (*args, *kwargs.values()) for t in _tensors(a)}),
                    "group_devices": group_devices,
                    "object": op in OBJECT_OPS,
                }
                rank = os.environ.get("RANK", "0")
                with open(os.path.join(out_dir, f"rank{rank}.jsonl"), "a") as f:
                    f.write(json.dumps(entry) + "\n")
            return fn(*args, **kwargs)

        return wrapper

    for op in OPS:
        fn = getattr(dist, op, None)
        if fn is not None:
            setattr(dist, op, record(op, fn))
