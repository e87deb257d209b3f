"""Reading configs: YAML files (merged in order), `--set KEY=VALUE` overrides, validation into a RunConfig with
every problem named, and the YAML a run directory keeps."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from clue_adv.config.messages import format_validation_errors
from clue_adv.config.paths import paths_from_file, require_nameable
from clue_adv.config.schema import RunConfig
from clue_adv.errors import ConfigError


def load_yaml(path: Path) -> dict[str, Any]:
    require_nameable(path, "config file", expands=False)  # a config path from the shell is already expanded
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(f"config file is not a readable file: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML error: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields, got {type(data).__name__}")
    return data


def read_config_file(path: Path) -> dict[str, Any]:
    """A config file's fields, the paths it names to read (data.path, a local model...) resolved from its folder:
    `configs/smoke.yaml` says `../clue_adv/assets/tokenizer` and works from any directory."""
    return paths_from_file(load_yaml(path), path.parent)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `--set a.b.c=value` (value parsed as YAML, so 3e-5, true, [1, 2] work)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    set_dotted(data, key.strip(), value, what=f"--set {key.strip()}")


def set_dotted(data: dict[str, Any], key: str, value: Any, what: str | None = None) -> None:
    """Set `data["a"]["b"]["c"] = value` for key "a.b.c", creating blocks; `what` names the source in errors."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{what or key}: '{part}' is not a block of fields")
        node = child
    # a copy: one sweep value is set into many run configs, which must not share (and later mutate) it
    node[parts[-1]] = copy.deepcopy(value)


def merge_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """`data` with {"a": {"b": value}} for key "a.b" deep-merged into it, as a config file with that block would be
    (`merge`): a sweep's `overrides: {data: {max_train_samples: 200}}` keeps the base's `data.path`. The value is
    copied: one sweep value goes into many run configs, which must not share (and later mutate) it."""
    nested: Any = copy.deepcopy(value)
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return merge(data, nested)


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        problems = format_validation_errors(e)
        raise ConfigError(f"{source}: {len(problems)} problem(s)", problems) from None


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` into `base` (later config files override earlier ones). A block whose `name`
    changes (e.g. another strategy) is replaced, not merged: the old strategy's fields would not fit."""
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        if (
            isinstance(old, dict)
            and isinstance(value, dict)
            and old.get("name", value.get("name")) == value.get("name", old.get("name"))
        ):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


def read_merged(paths: str | Path | list[str | Path], overrides: list[str] | None = None) -> tuple[dict[str, Any], str]:
    """YAML config file(s) merged in order (each one's paths relative to its own folder), then the `--set` overrides
    (their paths relative to the current directory): the raw mapping, before validation, and its source text."""
    files = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
    data: dict[str, Any] = {}
    for path in files:
        data = merge(data, read_config_file(path))
    for assignment in overrides or []:
        apply_override(data, assignment)
    return data, " + ".join(str(p) for p in files)


def load_config(paths: str | Path | list[str | Path], overrides: list[str] | None = None) -> RunConfig:
    """Read and merge YAML config(s), apply `--set` overrides, validate (`read_merged`). Raises ConfigError naming
    every problem."""
    data, source = read_merged(paths, overrides)
    return parse_config(data, source=source)


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.resolved(), sort_keys=False, allow_unicode=True)
