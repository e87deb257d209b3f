"""Variant naming: a run whose `--set` fields change what it computes gets its own experiment folder,
`<experiment>+key=value` (or `<experiment>+v<hash>` when that is too long), never the folder of the run without
them."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import yaml

from clue_adv.config.schema import RunConfig

# `--set` keys whose value the run directory shows already (experiment, task, seed; a strategy's parameters in its
# directory name) or that do not change what a run computes (where it is written, checkpoints, trackers: not part of
# its identity, see rundir._NOT_IDENTITY): every other `--set` names a variant of the experiment.
_NOT_A_VARIANT = ("experiment", "task", "seed", "output_dir", "checkpoint", "logging", "strategy")
# Where the task's data is read from (a local copy of CLUE, or the hub) is not what a run computes: the same run
# read from another folder is the same run (rundir.identity leaves it out too).
_WHERE_DATA_IS = ("data.path",)
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.=+-]")


def format_value(value: Any) -> str:
    """A value as it appears in a directory name: `3e-05`, `true`, `[1,2]`; a character no directory name may hold
    (`/`, `{`, a space) becomes `_`."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, int | float | str):
        text = str(value)
    else:
        text = json.dumps(value, separators=(",", ":"), default=str)
    return _UNSAFE_CHARS.sub("_", text)


def variant_name(experiment: str, fields: list[tuple[str, Any]]) -> str:
    """The experiment folder of a variant: `experiment+key=value` per field, in order (`smoke+optim.lr=3e-05`).
    When that is longer than an experiment name may be, `experiment+v` and a hash of the fields instead (the full
    values are in each run's config.yaml)."""
    suffix = "".join(f"+{key}={format_value(value)}" for key, value in fields)
    if len(experiment + suffix) <= 80:
        return experiment + suffix
    digest = hashlib.sha1(json.dumps(fields, default=str).encode()).hexdigest()[:10]
    return f"{experiment[: 80 - 12]}+v{digest}"


def set_variant_fields(assignments: list[str], tagged: bool = False) -> list[tuple[str, Any]]:
    """The `--set` fields that make a run a variant of its experiment (see _NOT_A_VARIANT), as (key, parsed value),
    the last value of a key repeated. With `tagged` (the strategy names its directory by `strategy.tag`, which hides
    its parameters) the strategy's parameters count too."""
    fields: dict[str, Any] = {}
    for assignment in assignments:
        key, _, raw = assignment.partition("=")
        key = key.strip()
        head, _, rest = key.partition(".")
        strategy_param = tagged and head == "strategy" and rest not in ("", "name", "tag")
        if (head in _NOT_A_VARIANT and not strategy_param) or key in _WHERE_DATA_IS:
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        fields.pop(key, None)
        fields[key] = value
    return list(fields.items())


def as_variant(cfg: RunConfig, assignments: list[str]) -> RunConfig:
    """`cfg` in the experiment folder its `--set` fields name (variant_name): a run with `--set optim.lr=3e-5` is
    `<experiment>+optim.lr=3e-05/...`, never the folder of the run without it."""
    fields = set_variant_fields(assignments, tagged=cfg.strategy.tag is not None)
    if not fields:
        return cfg
    return cfg.model_copy(update={"experiment": variant_name(cfg.experiment, fields)})
