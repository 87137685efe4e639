"""The Markdown reference of every run setting of the trainers: the tables of
``docs/configuration.md`` (a test checks they are current). Regenerate them with

    python -m dalle_ds.training.config_reference
"""

from __future__ import annotations

from .run_args import flag_name, setting_fields, shown_value
from .run_config import DalleRunConfig, DVAERunConfig, VQGANRunConfig

__all__ = ["config_reference"]


def config_reference() -> str:
    """One table per trainer: YAML key, flag, default, meaning."""
    lines = []
    trainers = (
        (DalleRunConfig, "train_dalle.py"),
        (DVAERunConfig, "train_dvae.py"),
        (VQGANRunConfig, "train_vqgan.py"),
    )
    for cls, script in trainers:
        lines += [f"### `scripts/{script}` ({cls.__name__})", "", "| YAML key | flag | default | meaning |",
                  "|---|---|---|---|"]  # fmt: skip
        for key, f, default, _ in setting_fields(cls):
            shown = "required" if f.metadata.get("required") else f"`{shown_value(default)}`"
            meaning = f.metadata["help"].replace("|", "\\|")
            lines.append(f"| `{key}` | `{flag_name(key, f)}` | {shown} | {meaning} |")
        lines.append("")
    return "\n".join(lines)



if __name__ == "__main__":
    print(config_reference(), end="")
