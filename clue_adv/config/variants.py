"""Variant naming: a run whose `--set` fields or override files (`-c A -c B`) change what it computes gets its own
experiment folder, `<experiment>+B+key=value` (or `<experiment>+v<hash>` when that is too long), never the folder of
the run without them."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from clue_adv.config.load import load_yaml
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


def variant_name(experiment: str, fields: list[tuple[str, Any]], files: Sequence[str] = ()) -> str:
    """The experiment folder of a variant: `+name` per override file (file_variant_names), then `+key=value` per
    field, in order (`smoke+tiny+optim.lr=3e-05`). When that is longer than an experiment name may be,
    `experiment+v` and a hash of them instead (the full values are in each run's config.yaml)."""
    suffix = "".join(f"+{name}" for name in files) + "".join(f"+{key}={format_value(value)}" for key, value in fields)
    if len(experiment + suffix) <= 80:
        return experiment + suffix
    named = [list(files), fields] if files else fields  # without files, the hash variants have always had
    digest = hashlib.sha1(json.dumps(named, default=str).encode()).hexdigest()[:10]
    return f"{experiment[: 80 - 12]}+v{digest}"


def _variant_fields(pairs: Iterable[tuple[str, Any]], tagged: bool) -> list[tuple[str, Any]]:
    """The (key, value) pairs that make a run a variant of its experiment (see _NOT_A_VARIANT), the last value of a
    key repeated. With `tagged` (the strategy names its directory by `strategy.tag`, which hides its parameters) the
    strategy's parameters count too."""
    fields: dict[str, Any] = {}
    for key, value in pairs:
        head, _, rest = key.partition(".")
        strategy_param = tagged and head == "strategy" and rest not in ("", "name", "tag")
        if (head in _NOT_A_VARIANT and not strategy_param) or key in _WHERE_DATA_IS:
            continue
        fields.pop(key, None)
        fields[key] = value
    return list(fields.items())


def set_variant_fields(assignments: list[str], tagged: bool = False) -> list[tuple[str, Any]]:
    """The `--set` fields that make a run a variant of its experiment, as (key, parsed value) (_variant_fields)."""
    pairs = []
    for assignment in assignments:
        key, _, raw = assignment.partition("=")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        pairs.append((key.strip(), value))
    return _variant_fields(pairs, tagged)


def _dotted(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """A config file's fields as `--set` would write them: (`optim.lr`, 0.001); an empty block is one value."""
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict) and value:
            out += _dotted(value, f"{prefix}{key}.")
        else:
            out.append((f"{prefix}{key}", value))
    return out


def file_variant_names(files: Sequence[str | Path], tagged: bool = False) -> list[str]:
    """The names (file name without extension, `overrides/tiny.yaml` -> `tiny`) of those `files` that set a field
    that makes a run a variant, as `--set` of that field would (_variant_fields): an override file of the model's
    size names one, a file of checkpoint or tracker settings does not."""
    names = []
    for path in files:
        if _variant_fields(_dotted(load_yaml(Path(path))), tagged):
            names.append(_UNSAFE_CHARS.sub("_", Path(path).stem) or "_")
    return names


def override_files(files: Sequence[str | Path]) -> list[Path]:
    """Of `-c A -c B -c C`, the files merged over the one whose `experiment` the run takes (the last that sets one,
    else the first): those that can make it a variant."""
    paths = [Path(p) for p in files]
    named = [i for i, path in enumerate(paths) if "experiment" in load_yaml(path)]
    return paths[(named[-1] if named else 0) + 1 :]


def as_variant(cfg: RunConfig, assignments: list[str], files: Sequence[str | Path] = ()) -> RunConfig:
    """`cfg` in the experiment folder its override files and `--set` fields name (variant_name): a run with
    `-c RUN -c overrides/tiny.yaml --set optim.lr=3e-5` is `<experiment>+tiny+optim.lr=3e-05/...`, never the folder
    of the run without them. `files`: every `-c` file, in order."""
    tagged = cfg.strategy.tag is not None
    fields = set_variant_fields(assignments, tagged=tagged)
    names = file_variant_names(override_files(files), tagged=tagged)
    if not fields and not names:
        return cfg
    return cfg.model_copy(update={"experiment": variant_name(cfg.experiment, fields, names)})
