"""Planning a sweep: every cell of the grid (tasks x strategy blocks x grid values x seeds) as a validated
RunConfig with its run directory and what that directory already holds. Every problem (bad keys, invalid
values, missing files, a directory holding another config) is collected into one ConfigError before anything
runs.

Grid keys `<strategy>.<param>` (e.g. `fgm.epsilon`) vary one strategy's blocks; `strategy.<param>` every block
that has that parameter; other keys (`optim.lr`) every cell. Strategy parameters show in the directory name
(`fgm-epsilon=0.1`); a run field's value is folded into the experiment name (`smoke+optim.lr=0.0003`), so each
value gets its own directory and its own table (with its own baseline) in the report. A cell's seed sets its
initialisation and data order, so runs of different strategies with the same seed differ only by the strategy.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from clue_adv.checks import check_data, check_paths, check_raw_paths
from clue_adv.config import (
    TASKS,
    RunConfig,
    apply_override,
    check_key,
    did_you_mean,
    expand_path,
    file_variant_names,
    format_validation_errors,
    format_value,
    merge,
    merge_dotted,
    read_config_file,
    set_dotted,
    set_variant_fields,
    variant_name,
)
from clue_adv.errors import ConfigError
from clue_adv.regularizers import registry
from clue_adv.regularizers.base import StrategyConfig
from clue_adv.rundir import existing_state, read_summary, run_dir
from clue_adv.sweep.config import MAX_RUNS, RESERVED, SweepConfig, load_sweep, reserved_key_problem


@dataclass
class Cell:
    """One planned run."""

    config: RunConfig
    directory: Path
    state: str  # absent | completed | failed | interrupted | running (an earlier run that stopped unmarked)

    @property
    def name(self) -> str:
        return f"{self.config.experiment}/{self.config.task}/{self.directory.parent.name}/seed-{self.config.seed}"

    @property
    def done(self) -> bool:
        return self.state == "completed"


@dataclass
class SweepPlan:
    sweep: SweepConfig
    source: str
    cells: list[Cell]

    def to_run(self, force: bool = False) -> list[Cell]:
        return list(self.cells) if force else [c for c in self.cells if not c.done]

    @property
    def experiments(self) -> list[str]:
        return list(dict.fromkeys(c.config.experiment for c in self.cells))

    @property
    def output_dir(self) -> Path:
        return Path(self.cells[0].config.output_dir)


def load_plan(
    path: str | Path,
    output_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    configs: list[str | Path] | None = None,
) -> SweepPlan:
    return plan_sweep(load_sweep(path), path, output_dir, overrides, force, configs)


def plan_sweep(
    sweep: SweepConfig,
    source: str | Path,
    output_dir: str | Path | None = None,
    overrides: list[str] | None = None,
    force: bool = False,
    configs: list[str | Path] | None = None,
) -> SweepPlan:
    """Every cell of the grid as a validated RunConfig with its directory and state. `configs`: run config files
    the command line names after the sweep file (`sweep -c SWEEP -c overrides/tiny.yaml`), deep-merged over every
    cell after the sweep's `overrides` and `per_task`, as repeated `--config` merges on `train`. `overrides`: the
    command line's `--set`, applied last. `force`: a directory holding another config's run is to be replaced
    (`--force`), not a problem."""
    source = Path(source)
    base = _base(sweep, source)
    extra: dict[str, Any] = {}
    for name in configs or []:  # relative to the working directory, like every path on the command line
        extra = merge(extra, read_config_file(Path(name)))
    problems = _set_key_problems(overrides or [])
    tasks = _tasks(sweep, base, problems)
    classes = {name: cls.config_class for name, cls in registry().items()}
    blocks = _strategy_blocks(sweep, base, problems)
    grid = _grid(sweep, blocks, classes, problems)
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s)", problems)
    # Counted before expanding: each cell is a validated RunConfig, so a huge grid would stall or run out of
    # memory long before it could be refused.
    n_run_values = math.prod(len(sweep.grid[k]) for k in grid.run)
    n_runs = len(sweep.seed_list()) * len(tasks) * n_run_values * grid.n_variants(blocks)
    if n_runs > MAX_RUNS:
        raise ConfigError(
            f"{source}: the sweep plans {n_runs} runs (seeds x tasks x grid x strategies); at most {MAX_RUNS}: "
            "fewer seeds or grid values, or split it into several sweeps"
        )
    # each further --config file that changes what the runs compute names their experiment, as on train
    names = file_variant_names(configs or [])
    cells, invalid = _expand(sweep, base, extra, names, tasks, blocks, grid, output_dir, overrides or [], problems)
    problems += _path_problems(cells, invalid)
    problems = list(dict.fromkeys(problems))
    problems += _read_states(cells, force)
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s)", problems)
    if not cells:
        raise ConfigError(f"{source}: the grid is empty")
    return SweepPlan(sweep, str(source), cells)


def _base(sweep: SweepConfig, source: Path) -> dict[str, Any]:
    """The base run config(s), merged in order; relative to the sweep file's directory."""
    base: dict[str, Any] = {}
    for name in [sweep.base] if isinstance(sweep.base, str) else sweep.base or []:
        base_path = expand_path(source.parent / name)  # None: a name no file can have
        if base_path is None or not base_path.is_file():
            raise ConfigError(
                f"{source}: base: run config not found: {base_path or source.parent / name} "
                "(paths are relative to the sweep file's directory)"
            )
        base = merge(base, read_config_file(base_path))
    return base


def _set_key_problems(overrides: list[str]) -> list[str]:
    """The command line's `--set` keys, held to the rules the schema applies to `overrides` keys."""
    keys = [assignment.partition("=")[0].strip() for assignment in overrides]
    return [f"--set {key}: {problem}" for key in keys if (problem := reserved_key_problem(key))]


def _tasks(sweep: SweepConfig, base: dict[str, Any], problems: list[str]) -> list[str]:
    base_task = base.get("task")
    if base_task is not None and not isinstance(base_task, str):
        problems.append(f"base task: {base_task!r} is not a task name (valid: {', '.join(TASKS)})")
        base_task = None
    tasks = list(sweep.tasks or [base_task])
    if tasks == [None]:
        problems.append("tasks: the base config names no task; list them in the sweep's `tasks`")
        tasks = []
    unknown_tasks = [t for t in tasks if t not in TASKS]
    if unknown_tasks:
        problems.append(f"base task: {unknown_tasks[0]!r} is not a task (valid: {', '.join(TASKS)})")
        tasks = [t for t in tasks if t in TASKS]
    if sweep.per_task and set(sweep.per_task) - set(tasks):
        problems.append(f"per_task: {', '.join(sorted(set(sweep.per_task) - set(tasks)))} not in the sweep's tasks")
    return tasks


def _parse_cell(data: dict[str, Any]) -> tuple[RunConfig | None, list[str]]:
    try:
        return RunConfig.model_validate(data), []
    except ValidationError as e:
        return None, format_validation_errors(e)


def _strategy_blocks(sweep: SweepConfig, base: dict[str, Any], problems: list[str]) -> list[StrategyConfig]:
    """The sweep's strategy blocks (its schema validated them), else the base's strategy, validated here."""
    if sweep.strategies:
        return list(sweep.strategies)
    cfg, errors = _parse_cell({"task": next(iter(TASKS)), "strategy": base.get("strategy") or {"name": "none"}})
    if cfg is None:
        problems += [f"base: {e}" for e in errors if e.startswith("strategy")]
        return []
    return [cfg.strategy]


@dataclass
class _Grid:
    """The grid's keys by what they vary: strategy parameters (key -> (strategy name, or None for every block
    that has the parameter; the parameter)) and run fields (every cell)."""

    values: dict[str, list[Any]]
    strategy: dict[str, tuple[str | None, str]]
    run: list[str]

    def variant_keys(self, block: StrategyConfig) -> list[tuple[str, str]]:
        return [
            (key, param)
            for key, (target, param) in self.strategy.items()
            if (target is None or target == block.name) and check_key(type(block), param) is None
        ]

    def n_variants(self, blocks: list[StrategyConfig]) -> int:
        return sum(math.prod(len(self.values[k]) for k, _ in self.variant_keys(b)) for b in blocks)

    def variants(self, block: StrategyConfig) -> list[dict[str, Any]]:
        """The block once per combination of its grid values, as the dict a run config's `strategy` reads."""
        keys = self.variant_keys(block)
        variants = []
        for values in itertools.product(*(self.values[k] for k, _ in keys)):
            variant = block.model_dump(exclude_unset=True)
            for (_, param), value in zip(keys, values, strict=True):
                set_dotted(variant, param, value)
            # A tag replaces the parameters in the directory name (StrategyConfig.directory_tag), so without the
            # grid values every variant of a tagged block would share one directory.
            if keys and variant.get("tag"):
                variant["tag"] += "".join(
                    f"-{param}={format_value(value)}" for (_, param), value in zip(keys, values, strict=True)
                )
            variants.append(variant)
        return variants


def _grid(
    sweep: SweepConfig, blocks: list[StrategyConfig], classes: dict[str, type[StrategyConfig]], problems: list[str]
) -> _Grid:
    """Who each grid key applies to; a key that names nothing is a problem."""
    grid = _Grid(sweep.grid, {}, [])
    names_in_sweep = {b.name for b in blocks}
    for key in sweep.grid:
        head, _, rest = key.partition(".")
        if head in RESERVED:
            problems.append(f"grid.{key}: set it with the sweep's `{RESERVED[head]}` field")
        elif head == "strategy" or head in classes:
            target = None if head == "strategy" else head
            owners = [n for n in names_in_sweep if n in classes and (target is None or n == target)]
            if not rest:
                problems.append(f"grid.{key}: name a parameter, e.g. {head}.epsilon")
            elif target is not None and target not in names_in_sweep:
                problems.append(f"grid.{key}: no `{target}` block in strategies")
            elif not any(check_key(classes[n], rest) is None for n in owners):
                params = sorted({p for n in owners for p in classes[n].model_fields if p != "name"})
                hint = did_you_mean(rest, params)
                problems.append(f"grid.{key}: no strategy in the sweep has a parameter '{rest}'{hint}")
            else:
                grid.strategy[key] = (target, rest)
        elif (msg := check_key(RunConfig, key)) is not None:
            hint = f" (or a strategy: {', '.join(classes)})" if head not in RunConfig.model_fields else ""
            problems.append(f"grid.{key}: {msg}{hint}")
        else:
            grid.run.append(key)
    return grid


def _with_task(value: Any, task: str) -> Any:
    if isinstance(value, str):
        return value.replace("{task}", task)
    if isinstance(value, dict):
        return {k: _with_task(v, task) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_task(v, task) for v in value]
    return value


def _expand(
    sweep: SweepConfig,
    base: dict[str, Any],
    extra: dict[str, Any],
    extra_names: list[str],
    tasks: list[str],
    blocks: list[StrategyConfig],
    grid: _Grid,
    output_dir: str | Path | None,
    overrides: list[str],
    problems: list[str],
) -> tuple[list[Cell], list[dict[str, Any]]]:
    """The cells, seed-major (so that pairs of strategies finish early), and the merged dicts of those whose
    values fail the run schema (their problems are added to `problems`)."""
    base_experiment = sweep.experiment or base.get("experiment") or "default"
    if not isinstance(base_experiment, str):  # the cell's schema check names it; the suffix needs a string
        base_experiment = str(base_experiment)
    cells: list[Cell] = []
    invalid: list[dict[str, Any]] = []
    seen: dict[Path, dict[str, Any]] = {}
    set_fields = set_variant_fields(overrides)  # the sweep refuses --set of strategy fields: never tagged
    for seed in sweep.seed_list():
        for task in tasks:
            for run_values in itertools.product(*(sweep.grid[k] for k in grid.run)):
                # the grid's run fields, then the command line's --set fields: the experiment folder of the variant
                fields = [*zip(grid.run, run_values, strict=True), *set_fields]
                experiment = variant_name(base_experiment, fields, extra_names)
                for block in blocks:
                    for variant in grid.variants(block):
                        data = copy.deepcopy(base)
                        # deep-merged like a further --config file: a block names only the fields it changes
                        for key, value in sweep.overrides.items():
                            data = merge_dotted(data, key, _with_task(value, task))
                        for key, value in sweep.per_task.get(task, {}).items():
                            data = merge_dotted(data, key, _with_task(value, task))
                        data = merge(data, extra)  # the command line's further --config files
                        for assignment in overrides:  # the command line has the last word
                            key, _, raw = assignment.partition("=")
                            apply_override(data, f"{key}={_with_task(raw, task)}")
                        for key, value in zip(grid.run, run_values, strict=True):
                            set_dotted(data, key, value)
                        data["task"] = task
                        data["strategy"] = variant
                        data["seed"] = seed
                        data["experiment"] = experiment
                        if output_dir is not None:
                            data["output_dir"] = str(output_dir)
                        elif sweep.output_dir is not None:
                            data["output_dir"] = sweep.output_dir
                        cfg, errs = _parse_cell(data)
                        if cfg is None:
                            # Invalid values do not depend on the seed: the label leaves it out, so each problem
                            # shows once. The paths the cell names are still checked, so a bad value does not
                            # hide a missing file.
                            label = f"{experiment}/{task}/{block.name}"
                            problems += [f"{label}: {e}" for e in errs]
                            invalid.append(data)
                            continue
                        directory = run_dir(cfg).resolve()
                        if directory in seen:
                            if seen[directory] != cfg.resolved():
                                problems.append(f"two cells share {directory} with different configs")
                            continue  # the same cell listed twice (e.g. a grid value equal to the default)
                        seen[directory] = cfg.resolved()
                        cells.append(Cell(cfg, directory, "absent"))
    return cells, invalid


def _path_problems(cells: list[Cell], invalid: list[dict[str, Any]]) -> list[str]:
    """Files and directories the cells name (data, model, tokenizer), as `clue-adv validate` checks them, once per
    distinct source: a wrong path fails here, not in the middle of the sweep."""
    problems: list[str] = []
    checked: set[str] = set()
    for cell in cells:
        c = cell.config
        key = json.dumps([c.task, c.data.model_dump(), c.model.model_dump(), c.max_length, c.logging.trackers])
        if key not in checked:
            checked.add(key)
            problems += [f"{c.experiment}/{c.task}: {p}" for p in check_paths(c)]
    for data in invalid:
        fields = ("task", "data", "model", "max_length", "logging")
        key = json.dumps([data.get(f) for f in fields], default=str)
        if key not in checked:
            checked.add(key)
            problems += [f"{data.get('experiment')}/{data.get('task')}: {p}" for p in check_raw_paths(data)]
    return problems


def _read_states(cells: list[Cell], force: bool = False) -> list[str]:
    """Set each cell's state from its directory; a directory holding another config that trained is a problem,
    unless `force`."""
    problems = []
    for cell in cells:
        try:
            state = existing_state(cell.config, cell.directory, force=force)
        except ConfigError as e:
            problems.append(e.message)
            continue
        if state == "incomplete":
            state = (read_summary(cell.directory) or {}).get("status", "running")
        cell.state = state
    return problems


def plan_data_problems(plan: SweepPlan) -> list[str]:
    """What `clue-adv validate` finds inside the local data files of the plan's cells (labels.json's size for
    the task, a malformed line, an unknown label, an empty split), read once per distinct data source; each
    problem names the cells that would read that data."""
    groups: dict[tuple[Any, ...], list[Cell]] = {}
    for cell in plan.cells:
        # Everything check_data reads (Sources.of): cells that differ in any of it are checked apart.
        key = (cell.config.task, cell.config.data.model_dump_json())
        groups.setdefault(key, []).append(cell)
    problems: list[str] = []
    for cells in groups.values():
        found = check_data(cells[0].config)
        if not found:
            continue
        names = ", ".join(c.name for c in cells[:3]) + (f" and {len(cells) - 3} more" if len(cells) > 3 else "")
        problems += [f"{p} (cell{'s' if len(cells) > 1 else ''} {names})" for p in found]
    return list(dict.fromkeys(problems))
