"""`clue-adv validate`: schema errors plus the checks that need the filesystem, all reported at once,
before any training starts or any directory is created."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from clue_adv.checks import (
    Sources,
    check_pretrain_paths,
    data_problems,
    hub_position_check,
    offline_hub_warning,
    path_problems,
)
from clue_adv.config import TASKS, apply_override, expand_path, load_yaml, merge, parse_config, paths_from_file
from clue_adv.errors import ClueAdvError, DataError
from clue_adv.pretrain.config import PretrainConfig, is_pretrain_config, parse_pretrain_config
from clue_adv.pretrain.text import read_texts
from clue_adv.sweep import load_plan


def _pretrain_data_problems(cfg: PretrainConfig) -> list[str]:
    """The local text, read as pretraining reads it (not tokenized): bad lines, too few texts."""
    if not cfg.data.is_local or check_pretrain_paths(cfg):
        return []
    try:
        read_texts(cfg)
    except DataError as e:
        return [f"data: {e.message}"]
    return []


def _validate_pretrain(data: dict[str, Any], source: str) -> list[str]:
    try:
        cfg = parse_pretrain_config(data, source)
    except ClueAdvError as e:
        return e.problems or [e.message]
    return check_pretrain_paths(cfg) + _pretrain_data_problems(cfg)


SWEEP_ONLY_FIELDS = {"base", "seeds", "strategies", "grid", "per_task", "tasks", "overrides", "slurm"}


def _is_sweep(data: dict[str, Any]) -> bool:
    # Run configs reject these keys, so one of them at the top level means the file is a sweep.
    return bool(SWEEP_ONLY_FIELDS & set(data))


def _raw_sweep_problems(path: Path, data: dict[str, Any]) -> list[str]:
    """What can be checked from a sweep file's raw YAML when its schema fails (load_plan stops at the first
    stage that fails): base files exist, the experiment name is usable. Messages match load_plan's, so
    a problem both find is reported once."""
    problems = []
    base = data.get("base")
    for name in [base] if isinstance(base, str) else base if isinstance(base, list) else []:
        full = expand_path(path.parent / name) if isinstance(name, str) else None
        if isinstance(name, str) and (full is None or not full.is_file()):
            problems.append(
                f"{path}: base: run config not found: {full or path.parent / name} "
                "(paths are relative to the sweep file's directory)"
            )
    experiment = data.get("experiment")
    if experiment is not None:
        try:
            parse_config({"task": next(iter(TASKS)), "experiment": experiment})
        except ClueAdvError as e:
            problems += [p for p in e.problems if p.startswith("experiment")]
    return problems


def _validate_sweep(path: Path, merged: list[Path], overrides: list[str], notes: list[str] | None = None) -> list[str]:
    try:
        plan = load_plan(path, overrides=overrides, configs=list(merged))  # merged over every cell, as `sweep -c`
    except ClueAdvError as e:
        problems = e.problems or [e.message]
        try:
            raw = load_yaml(path)
        except ClueAdvError:
            return problems
        return list(dict.fromkeys(problems + _raw_sweep_problems(path, raw)))
    # load_plan has checked every cell's schema and paths; the data contents and hub models remain, once per
    # source.
    problems = []
    seen: set[Sources] = set()
    for cell in plan.cells:
        sources = Sources.of(cell.config)
        if sources not in seen:
            seen.add(sources)
            where = f"{cell.config.experiment}/{cell.config.task}"
            hub_problems, hub_notes = hub_position_check(sources)
            problems += [f"{where}: {p}" for p in hub_problems + data_problems(sources)]
            if notes is not None:
                notes += [n for n in hub_notes if n not in notes]
    offline = offline_hub_warning(list(seen))
    if notes is not None and offline:
        notes.insert(0, offline)
    return list(dict.fromkeys(problems))


def validate_file(
    path: Path | list[Path], overrides: list[str] | None = None, notes: list[str] | None = None
) -> list[str]:
    """Every problem of one config file, or of several merged, or of a sweep file and each of its cells
    (empty list: valid). Schema problems do not hide path or data problems in the same file. `notes`, when
    given, receives what could not be checked (not problems: the file may still be valid)."""
    files = [Path(p) for p in (path if isinstance(path, list) else [path])]
    data: dict[str, Any] = {}
    try:
        for i, f in enumerate(files):
            loaded = load_yaml(f)
            if i == 0 and _is_sweep(loaded):
                return _validate_sweep(f, files[1:], overrides or [], notes)
            data = merge(data, paths_from_file(loaded, f.parent))  # as train reads it (config.read_config_file)
        for assignment in overrides or []:
            apply_override(data, assignment)
    except ClueAdvError as e:
        return e.problems or [e.message]
    if is_pretrain_config(data):
        return _validate_pretrain(data, " + ".join(map(str, files)))
    try:
        sources = Sources.of(parse_config(data, source=" + ".join(map(str, files))))
        problems: list[str] = []
    except ClueAdvError as e:
        sources = Sources.raw(data)
        problems = e.problems or [e.message]
    hub_problems, hub_notes = hub_position_check(sources)
    if notes is not None:
        notes += [w for w in [offline_hub_warning([sources])] if w] + hub_notes
    return problems + path_problems(sources) + hub_problems + data_problems(sources)
