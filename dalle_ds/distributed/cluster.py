"""Hostfile checks before a multi-node launch: syntax, duplicate hosts, slots, and the world size
against the DeepSpeed config's batch sizes, with errors that name the file and line.

    python -m dalle_ds.distributed.cluster HOSTFILE --deepspeed_config ds_configs/zero2_bf16.json \\
        [--include worker-0@worker-1] [--exclude worker-1:0] [-- training args...]

The training arguments after ``--`` (``--micro-batch-size``, ``--grad-accum``) are read the way
the trainers read them, so the check sees the batch sizes the run will use.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

__all__ = ["HostfileError", "check_launch", "parse_hostfile", "select_slots"]

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.\-]+)\s+slots\s*=\s*(?P<slots>-?\d+)\s*$")


class HostfileError(ValueError):
    pass


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """``{host: slots}`` in file order, as DeepSpeed's launcher reads it (``# comments`` and blank lines
    ignored); any other line, a repeated host or slots < 1 is an error naming ``path:line``."""
    path = Path(path)
    if not path.is_file():
        raise HostfileError(f"hostfile {path} does not exist")
    hosts: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if match is None:
            raise HostfileError(f"{path}:{number}: {raw.strip()!r} is not '<hostname> slots=<N>'")
        host, slots = match["host"], int(match["slots"])
        if host in hosts:
            raise HostfileError(f"{path}:{number}: host {host!r} is listed again (first on line {first_seen[host]})")
        if slots < 1:
            raise HostfileError(f"{path}:{number}: host {host!r} has slots={slots}; need at least 1")
        hosts[host], first_seen[host] = slots, number
    if not hosts:
        raise HostfileError(f"{path}: no hosts (lines '<hostname> slots=<N>')")
    return hosts


def _filter(spec: str, hosts: dict[str, int], source: str) -> dict[str, list[int]]:
    """DeepSpeed's ``worker-0@worker-1:0,2`` syntax -> {host: slot indices}."""
    out: dict[str, list[int]] = {}
    for part in spec.split("@"):
        host, _, slots = part.partition(":")
        if host not in hosts:
            raise HostfileError(f"{source}: host {host!r} is not in the hostfile ({', '.join(hosts)})")
        picked = [int(s) for s in slots.split(",")] if slots else list(range(hosts[host]))
        bad = [s for s in picked if not 0 <= s < hosts[host]]
        if bad:
            raise HostfileError(f"{source}: {host} has slots 0..{hosts[host] - 1}, not {bad}")
        out[host] = picked
    return out


def select_slots(hosts: dict[str, int], include: str = "", exclude: str = "") -> dict[str, list[int]]:
    """The slots a launch with ``--include`` / ``--exclude`` uses, per host."""
    if include and exclude:
        raise HostfileError("--include and --exclude cannot be used together (as in DeepSpeed's launcher)")
    if include:
        return _filter(include, hosts, f"--include {include}")
    chosen = {host: list(range(n)) for host, n in hosts.items()}
    if exclude:
        for host, slots in _filter(exclude, hosts, f"--exclude {exclude}").items():
            chosen[host] = [s for s in chosen[host] if s not in slots]  # no ":N" = all of the host's slots
        chosen = {h: s for h, s in chosen.items() if s}
    if not chosen:
        raise HostfileError("no slots left after --exclude")
    return chosen


def trainer_batch_settings(train_args) -> tuple[int | None, int | None]:
    """(micro batch, gradient accumulation) a trainer command line sets: its ``--micro-batch-size`` /
    ``--grad-accum`` flags, else the ``train`` section of its ``--config`` run YAML (flag > YAML, as
    the trainers resolve them; dalle_ds.training.run_config names these settings)."""
    import yaml

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--config", default=None)
    known, _ = p.parse_known_args(list(map(str, train_args)))
    train = {}
    if known.config and Path(known.config).is_file():
        data = yaml.safe_load(Path(known.config).read_text()) or {}
        train = data.get("train") or {} if isinstance(data, dict) else {}
    micro = known.micro_batch_size if known.micro_batch_size is not None else train.get("micro_batch_size")
    accum = known.grad_accum if known.grad_accum is not None else train.get("grad_accum")
    return micro, accum


def check_launch(hostfile, ds_config, train_args=(), include: str = "", exclude: str = "") -> dict:
    """Validate a launch; returns a summary (hosts, world size, resolved batch sizes)."""
    from .ds_config import load_ds_config, prepare_ds_config

    slots = select_slots(parse_hostfile(hostfile), include, exclude)
    world = sum(len(s) for s in slots.values())
    micro, accum = trainer_batch_settings(train_args)
    config = prepare_ds_config(
        load_ds_config(ds_config), world_size=world, micro_batch_size=micro, gradient_accumulation_steps=accum,
        source=str(ds_config),
    )  # fmt: skip
    return {
        "hosts": {h: len(s) for h, s in slots.items()},
        "world_size": world,
        "train_batch_size": config["train_batch_size"],
        "train_micro_batch_size_per_gpu": config["train_micro_batch_size_per_gpu"],
        "gradient_accumulation_steps": config["gradient_accumulation_steps"],
    }


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = []
    if "--" in argv:
        i = argv.index("--")
        argv, rest = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("hostfile")
    p.add_argument("--deepspeed_config", required=True)
    p.add_argument("--include", default="")
    p.add_argument("--exclude", default="")
    args = p.parse_args(argv)
    from .ds_config import DeepSpeedConfigError

    try:
        summary = check_launch(args.hostfile, args.deepspeed_config, rest, args.include, args.exclude)
    except (HostfileError, DeepSpeedConfigError) as err:
        print(f"launch check failed: {err}", file=sys.stderr)
        return 2
    hosts = ", ".join(f"{h}:{n}" for h, n in summary["hosts"].items())
    print(
        f"launch check ok: {summary['world_size']} ranks ({hosts}); train_batch_size="
        f"{summary['train_batch_size']} = {summary['train_micro_batch_size_per_gpu']} micro x "
        f"{summary['gradient_accumulation_steps']} accumulation x {summary['world_size']} ranks"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
