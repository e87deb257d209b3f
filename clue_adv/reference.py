"""The config reference (docs/CONFIG.md), generated from the pydantic schema so it cannot drift."""

from __future__ import annotations

import typing
from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from clue_adv.config import RunConfig
from clue_adv.pretrain.config import PretrainConfig
from clue_adv.regularizers import registry
from clue_adv.schema import StrictModel


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()
        return "(block)" if isinstance(value, StrictModel) else repr(value)
    if field.default is PydanticUndefined:
        return "**required**"
    return f"`{field.default!r}`"


def _type(field: FieldInfo) -> str:
    ann = field.annotation
    if typing.get_origin(ann) is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in typing.get_args(ann))
    args = typing.get_args(ann)
    if type(None) in args and any(typing.get_origin(a) is typing.Literal for a in args):  # Literal[...] | None
        return " \\| ".join([f"`{v}`" for a in args for v in typing.get_args(a)] + ["None"])
    text = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
    return text.replace("|", "\\|")


def _optional_block(ann: Any) -> type[StrictModel] | None:
    """The block of an `X | None` field (e.g. eval.early_stopping: off when null), else None."""
    args = typing.get_args(ann)
    if type(None) not in args:
        return None
    blocks = [a for a in args if isinstance(a, type) and issubclass(a, StrictModel)]
    return blocks[0] if len(blocks) == 1 else None


def _rows(model: type[StrictModel], prefix: str = "") -> list[str]:
    rows, blocks = [], []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, StrictModel):
            blocks.append((f"{prefix}{name}.", ann))
            continue
        if (block := _optional_block(ann)) is not None:  # its own row (null is a value), then its fields
            desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            rows.append(f"| `{prefix}{name}` | block \\| None | {_default(field)} | {desc} |")
            blocks.append((f"{prefix}{name}.", block))
            continue
        if name == "strategy" and not prefix:
            rows.append(f"| `strategy` | block | `{{name: none}}` | {field.description} See below. |")
            continue
        desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(f"| `{prefix}{name}` | {_type(field)} | {_default(field)} | {desc} |")
    for sub_prefix, sub in blocks:
        rows.extend(_rows(sub, sub_prefix))
    return rows


def config_reference() -> str:
    header = "| field | type | default | description |\n|---|---|---|---|"
    parts = [
        "# Config reference",
        "",
        "Generated from the schema in `clue_adv/config/schema.py` and `clue_adv/regularizers/` by "
        "`python -m clue_adv.reference > docs/CONFIG.md` (a test fails when this file is stale). "
        "Unknown fields are errors. Any field can be set from the shell: `--set optim.lr=3e-5`.",
        "",
        "## Run config",
        "",
        header,
        *_rows(RunConfig),
        "",
        "## Strategies (`strategy.name` selects the block)",
    ]
    for name, cls in registry().items():
        cost = cls(cls.config_class()).cost()
        double = " + double backward" if cost.double_backward else ""
        parts += [
            "",
            f"### `{name}`: {cls.summary}",
            "",
            f"Cost per step: {cost.forward} forward, {cost.backward} backward{double}"
            + (
                f" on {cost.batch_factor}×B examples (= {cost.forward_at_batch} forward, "
                f"{cost.backward_at_batch} backward at batch B)."
                if cost.batch_factor > 1
                else "."
            )
            + (f" {cost.note}" if cost.note else ""),
        ]
        rows = [r.replace("| `", "| `strategy.", 1) for r in _rows(cls.config_class) if not r.startswith("| `name`")]
        if rows:
            parts += ["", header, *rows]
    # The pretrain config (`clue-adv pretrain`), after the run config's strategies
    parts += [
        "",
        "## Pretrain config (`clue-adv pretrain`)",
        "",
        "Masked-LM pretraining on a task's training text; its output directory fine-tunes with `model.init: "
        "pretrained` and `model.name_or_path: <run>/model`. `model.*` is the run config's block (above).",
        "",
        header,
        *[r for r in _rows(PretrainConfig) if not r.startswith("| `model.")],
    ]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(config_reference(), end="")
