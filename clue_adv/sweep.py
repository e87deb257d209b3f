"""Sweeps: a grid of runs (tasks × strategies × hyperparameter values × seeds), one run directory each.

A sweep file names a base run config and what varies. Every cell is a full `RunConfig`, validated like
any config before anything runs; its directory is the one `clue-adv train` would use, so a sweep resumes
where it stopped (completed runs with the same config are skipped, failed or interrupted ones rerun) and
`clue-adv report` reads the result.

Choices worth knowing:

* `base` is resolved relative to the sweep file's directory (`sweeps/x.yaml` names `../configs/y.yaml`),
  so a sweep file works from any working directory. Paths *inside* run configs (data.path, model paths)
  stay relative to the working directory, as in `clue-adv train`.
* Grid keys `<strategy-name>.<param>` (e.g. `fgm.epsilon`) vary one strategy's blocks; `strategy.<param>`
  varies every block that has that parameter; other keys (`optim.lr`) vary every cell. Strategy parameters
  already show in the directory name (`fgm-epsilon=0.1`); a non-strategy value is folded into the
  experiment name (`smoke+optim.lr=0.0003`), so different values never share a directory and each value
  gets its own table (with its own baseline) in the report.
* Paired seeds: a cell's seed sets its initialisation and data order (see data.train_loader), so the
  runs of different strategies with the same seed differ only by the strategy.
* Local parallel runs (`jobs > 1`, or any `devices`) are subprocesses (`python -m clue_adv.sweep`): a
  crash or an out-of-memory kill in one run cannot take the sweep down; each worker gets its share of
  the CPU cores (threads and affinity) and, with `devices`, one GPU (CUDA_VISIBLE_DEVICES). One job runs
  in-process and shows the run's own progress bar under the sweep's.
* `executor="slurm"` submits the cells as one Slurm job array through submitit (resources from the
  sweep's `slurm` block) and waits for it; `submitit-local` runs the same path on this machine. Each run
  directory records its job (`slurm.json`) and links the job's logs (`slurm.out`, `slurm.err`), so
  `--status` tells pending from running and a later sweep waits for a run still in the queue instead of
  submitting it twice. The wait watches the queue with squeue (sacct needs accounting, which many
  clusters lack): a job that leaves it without a result (scancel, time limit, out of memory) is a failed
  run, rerun by the next sweep.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import getpass
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, Field, ValidationError, field_validator
from rich.console import Console

from clue_adv.checks import check_data, check_paths, check_raw_paths
from clue_adv.config import (
    MAX_SEED,
    TASKS,
    RunConfig,
    apply_override,
    dump_config,
    expand_path,
    format_validation_errors,
    load_yaml,
    merge,
    set_dotted,
)
from clue_adv.errors import ClueAdvError, ConfigError, RunFailed, handle_sigint, sigterm_as_interrupt
from clue_adv.rundir import (
    STALE_NOTE,
    SWEEP_MANIFEST,
    atomic_write_json,
    atomic_write_text,
    existing_state,
    identity,
    open_in_run_dir,
    read_config,
    read_summary,
    run_dir,
    run_lock_held,
    stale_running,
    stored_identity,
)
from clue_adv.schema import StrictModel

Task = Literal["tnews", "iflytek"]
# Fields a sweep sets through its own keys; varying them through `grid`/`overrides` would break naming.
_RESERVED = {
    "task": "tasks",
    "seed": "seeds",
    "experiment": "experiment",
    "output_dir": "output_dir",
}
EXECUTORS = ("local", "slurm", "submitit-local")
# Far past any real study (each run is a fine-tuning, minutes to hours of GPU time) but small
# enough that expanding and validating the plan stays quick: a typo like `seeds: 200000` fails at once
# instead of hanging `--dry-run` or exhausting memory.
MAX_SEEDS = 1000
MAX_RUNS = 100_000


class SlurmConfig(StrictModel):
    """Resources of each array task when the sweep runs with `--executor slurm` (through submitit)."""

    partition: str | None = Field(None, description="Slurm partition (`--partition`); default: the cluster's.")
    time_min: int = Field(
        24 * 60, gt=0, description="Time limit per run in minutes (a study-length BERT-base run: several hours)."
    )
    cpus_per_task: int = Field(8, gt=0, description="CPU cores per run (data loading, tokenization).")
    gpus_per_node: int = Field(1, ge=0, description="GPUs per run (one run per GPU).")
    mem_gb: int = Field(64, gt=0, description="Host memory per run in GB.")
    array_parallelism: int = Field(32, gt=0, description="At most this many array tasks run at once (`%N`).")
    account: str | None = Field(None, description="Slurm account (`--account`).")
    qos: str | None = Field(None, description="Quality of service (`--qos`).")
    constraint: str | None = Field(None, description="Node features (`--constraint`), e.g. a GPU model.")
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run before each job, e.g. `module load cuda` or `source venv/bin/activate`.",
    )
    additional: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra sbatch options, e.g. {exclude: node12} for `--exclude=node12`.",
    )
    log_dir: str | None = Field(
        None,
        description="Where submitit keeps job scripts, pickles and logs (one folder per array task); default: "
        "<output_dir>/<experiment>/slurm. Each run directory links its job's logs as slurm.out and slurm.err.",
    )


class SweepConfig(StrictModel):
    """A grid of runs. Every cell is a run config: the base, then `overrides`, `per_task`, the command
    line's `--set`, the task, the strategy block, the grid values, the seed."""

    base: str | list[str] | None = Field(
        None,
        description="Run config(s) every cell starts from, relative to the sweep file's directory; a list is "
        "merged in order like repeated `--config`. Omitted: the RunConfig defaults (BERT-base from the hub).",
    )
    experiment: str | None = Field(None, description="Experiment name (directory level); default: the base's.")
    output_dir: str | None = Field(None, description="Root of the run directories; default: the base's.")
    tasks: list[Task] | None = Field(None, description="CLUE tasks; default: the base's task.")
    seeds: Annotated[int, Field(le=MAX_SEEDS)] | Annotated[list[int], Field(max_length=MAX_SEEDS)] = Field(
        5,
        description=f"Seeds: a count N (seeds 1..N) or an explicit list. The same seeds for every strategy. At "
        f"most {MAX_SEEDS}, so that a typo (`seeds: 200000`) fails at once instead of stalling the plan.",
    )
    strategies: list[dict[str, Any]] | None = Field(
        None,
        description="Strategy blocks (`name` plus parameters, as in a run config's `strategy`); default: the "
        "base's strategy. Include `{name: none}` for the baseline the report compares against.",
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Dotted key -> values; every combination is crossed with the rest. `fgm.epsilon` varies the "
        "fgm blocks, `strategy.epsilon` every block that has `epsilon`, `optim.lr` every cell.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted key -> value applied to every cell (e.g. a tiny model). `{task}` in a string value "
        "is replaced by the cell's task (data.path: data/clue/{task}).",
    )
    per_task: dict[Task, dict[str, Any]] = Field(
        default_factory=dict, description="Task -> {dotted key: value} applied to that task's cells only."
    )
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="Slurm resources (`--executor slurm`).")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: int | list[int]) -> int | list[int]:
        if isinstance(v, int):
            if v < 1:
                raise ValueError("a seed count must be at least 1")
            return v
        if not v:
            raise ValueError("the seed list is empty")
        if any(s < 0 or s > MAX_SEED for s in v):
            raise ValueError(f"seeds must be between 0 and {MAX_SEED}")
        if len(set(v)) != len(v):
            raise ValueError("seeds repeat")
        return v

    @field_validator("grid")
    @classmethod
    def _grid_values(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in v.items():
            if not values:
                raise ValueError(f"{key}: needs at least one value")
            if len({json.dumps(x, sort_keys=True, default=str) for x in values}) != len(values):
                raise ValueError(f"{key}: values repeat")
        return v

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError("list each task once, at least one")
        return v

    def seed_list(self) -> list[int]:
        return list(range(1, self.seeds + 1)) if isinstance(self.seeds, int) else list(self.seeds)


# --------------------------------------------------------------------------------------------------
# Loading and expanding the grid


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


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    data = load_yaml(path)
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as e:
        problems = format_validation_errors(e, SweepConfig)
        raise ConfigError(f"{path}: {len(problems)} problem(s)", problems) from None


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def check_key(root: type[BaseModel], key: str) -> str | None:
    """None if `key` (dotted) names a field of `root`, else a message with a 'did you mean'."""
    model: type[BaseModel] | None = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        if model is None:
            return f"'{'.'.join(parts[:i])}' is not a block of fields"
        fields = model.model_fields
        if part not in fields:
            close = difflib.get_close_matches(part, list(fields), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(fields)})"
            where = ".".join(parts[:i])
            return f"unknown field '{part}'" + (f" in '{where}'" if where else "") + hint
        model = _model_of(fields[part].annotation)
    return None


def _check_reserved(section: str, key: str) -> str | None:
    head = key.split(".")[0]
    if head in _RESERVED:
        return f"{section}.{key}: set it with the sweep's `{_RESERVED[head]}` field"
    if head == "strategy":
        return f"{section}.{key}: strategy fields belong in `strategies` blocks (or `grid`)"
    return None


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
    if isinstance(value, int | float) and not isinstance(value, bool):
        text = str(value)
    return text.replace("/", "_").replace("\\", "_").replace(" ", "")


def _with_task(value: Any, task: str) -> Any:
    if isinstance(value, str):
        return value.replace("{task}", task)
    if isinstance(value, dict):
        return {k: _with_task(v, task) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_task(v, task) for v in value]
    return value


def _strategy_classes() -> dict[str, type[BaseModel]]:
    from clue_adv.regularizers import registry

    return {name: cls.config_class for name, cls in registry().items()}


def _parse_cell(data: dict[str, Any]) -> tuple[RunConfig | None, list[str]]:
    try:
        return RunConfig.model_validate(data), []
    except ValidationError as e:
        return None, format_validation_errors(e)


def plan_sweep(
    sweep: SweepConfig,
    source: str | Path,
    output_dir: str | Path | None = None,
    overrides: list[str] | None = None,
) -> SweepPlan:
    """Every cell of the grid as a validated RunConfig with its directory and state. All problems (bad
    keys, invalid values, a directory holding a different config) are collected into one ConfigError
    before anything runs."""
    source = Path(source)
    problems: list[str] = []

    base: dict[str, Any] = {}
    for name in [sweep.base] if isinstance(sweep.base, str) else sweep.base or []:
        base_path = expand_path(source.parent / name)  # None: a name no file can have
        if base_path is None or not base_path.is_file():
            raise ConfigError(
                f"{source}: base: run config not found: {base_path or source.parent / name} "
                "(paths are relative to the sweep file's directory)"
            )
        base = merge(base, load_yaml(base_path))
    for assignment in overrides or []:  # `--set` on the command line: applied like `overrides`
        key = assignment.partition("=")[0].strip()
        problem = _check_reserved("--set", key) or (
            f"--set {key}: {msg}" if (msg := check_key(RunConfig, key)) else None
        )
        if problem:
            problems.append(problem)
    for key in sweep.overrides:
        problem = _check_reserved("overrides", key) or (
            f"overrides.{key}: {msg}" if (msg := check_key(RunConfig, key)) else None
        )
        if problem:
            problems.append(problem)
    for task, block in sweep.per_task.items():
        for key in block:
            problem = _check_reserved(f"per_task.{task}", key) or (
                f"per_task.{task}.{key}: {msg}" if (msg := check_key(RunConfig, key)) else None
            )
            if problem:
                problems.append(problem)

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

    # Strategy blocks, each validated through the run schema (so names and parameters are checked
    # against whatever strategies are registered).
    classes = _strategy_classes()
    blocks = [copy.deepcopy(b) for b in (sweep.strategies or [base.get("strategy") or {"name": "none"}])]
    for i, block in enumerate(blocks):
        if not isinstance(block, dict) or "name" not in block:
            problems.append(f"strategies[{i}]: a block needs a `name` (valid: {', '.join(classes)})")
            continue
        if not isinstance(block["name"], str):  # a list or mapping would also break the name lookups below
            problems.append(
                f"strategies[{i}].name: must be a strategy name (a string), got {block['name']!r} "
                f"(valid: {', '.join(classes)})"
            )
            continue
        _, errs = _parse_cell({"task": "tnews", "strategy": block})
        problems += [f"strategies[{i}] ({block['name']}): {e.removeprefix('strategy.')}" for e in errs]

    # Grid keys: who each one applies to.
    strategy_grid: dict[str, tuple[str | None, str]] = {}  # key -> (strategy name or None for all, param)
    run_grid: list[str] = []
    names_in_sweep = {b.get("name") for b in blocks if isinstance(b, dict) and isinstance(b.get("name"), str)}
    for key in sweep.grid:
        head, _, rest = key.partition(".")
        if head in _RESERVED:
            problems.append(f"grid.{key}: set it with the sweep's `{_RESERVED[head]}` field")
        elif head == "strategy" or head in classes:
            target = None if head == "strategy" else head
            owners = [n for n in names_in_sweep if n in classes and (target is None or n == target)]
            if not rest:
                problems.append(f"grid.{key}: name a parameter, e.g. {head}.epsilon")
            elif target is not None and target not in names_in_sweep:
                problems.append(f"grid.{key}: no `{target}` block in strategies")
            elif not any(check_key(classes[n], rest) is None for n in owners):
                params = sorted({p for n in owners for p in classes[n].model_fields if p != "name"})
                close = difflib.get_close_matches(rest, params, n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(params)})"
                problems.append(f"grid.{key}: no strategy in the sweep has a parameter '{rest}'{hint}")
            else:
                strategy_grid[key] = (target, rest)
        elif (msg := check_key(RunConfig, key)) is not None:
            hint = f" (or a strategy: {', '.join(classes)})" if head not in RunConfig.model_fields else ""
            problems.append(f"grid.{key}: {msg}{hint}")
        else:
            run_grid.append(key)
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s)", problems)

    def variant_keys(block: dict[str, Any]) -> list[tuple[str, str]]:
        return [
            (key, param)
            for key, (target, param) in strategy_grid.items()
            if (target is None or target == block["name"]) and check_key(classes[block["name"]], param) is None
        ]

    # Count before expanding: each cell is a validated RunConfig, so a huge grid would stall or run out of
    # memory long before it could be refused.
    n_variants = sum(math.prod(len(sweep.grid[k]) for k, _ in variant_keys(b)) for b in blocks)
    n_runs = len(sweep.seed_list()) * len(tasks) * math.prod(len(sweep.grid[k]) for k in run_grid) * n_variants
    if n_runs > MAX_RUNS:
        raise ConfigError(
            f"{source}: the sweep plans {n_runs} runs (seeds x tasks x grid x strategies); at most {MAX_RUNS}: "
            "fewer seeds or grid values, or split it into several sweeps"
        )

    def strategy_variants(block: dict[str, Any]) -> list[dict[str, Any]]:
        keys = variant_keys(block)
        variants = []
        for values in itertools.product(*(sweep.grid[k] for k, _ in keys)):
            variant = copy.deepcopy(block)
            for (_, param), value in zip(keys, values, strict=True):
                set_dotted(variant, param, value)
            # A tag replaces the parameters in the directory name (StrategyConfig.directory_tag), so without the
            # grid values every variant of a tagged block would share one directory.
            if keys and variant.get("tag"):
                variant["tag"] += "".join(
                    f"-{param}={_format_value(value)}" for (_, param), value in zip(keys, values, strict=True)
                )
            variants.append(variant)
        return variants

    base_experiment = sweep.experiment or base.get("experiment") or "default"
    if not isinstance(base_experiment, str):  # the cell's schema check names it; the suffix needs a string
        base_experiment = str(base_experiment)
    cells: list[Cell] = []
    raw_cells: list[dict[str, Any]] = []  # cells whose values fail the schema
    seen: dict[Path, dict[str, Any]] = {}
    for seed in sweep.seed_list():
        for task in tasks:
            for run_values in itertools.product(*(sweep.grid[k] for k in run_grid)):
                suffix = "".join(f"+{k}={_format_value(v)}" for k, v in zip(run_grid, run_values, strict=True))
                for block in blocks:
                    for variant in strategy_variants(block):
                        data = copy.deepcopy(base)
                        for key, value in sweep.overrides.items():
                            set_dotted(data, key, _with_task(value, task))
                        for key, value in sweep.per_task.get(task, {}).items():
                            set_dotted(data, key, _with_task(value, task))
                        for assignment in overrides or []:  # the command line has the last word
                            key, _, raw = assignment.partition("=")
                            apply_override(data, f"{key}={_with_task(raw, task)}")
                        for key, value in zip(run_grid, run_values, strict=True):
                            set_dotted(data, key, value)
                        data["task"] = task
                        data["strategy"] = variant
                        data["seed"] = seed
                        data["experiment"] = base_experiment + suffix
                        if output_dir is not None:
                            data["output_dir"] = str(output_dir)
                        elif sweep.output_dir is not None:
                            data["output_dir"] = sweep.output_dir
                        cfg, errs = _parse_cell(data)
                        if cfg is None:
                            # Invalid values do not depend on the seed: the label leaves it out, so each
                            # problem shows once. The paths the cell names are still checked (below, as
                            # for valid cells), so a bad value does not hide a missing file.
                            label = f"{base_experiment + suffix}/{task}/{variant.get('name')}"
                            problems += [f"{label}: {e}" for e in errs]
                            raw_cells.append(data)
                            continue
                        directory = run_dir(cfg).resolve()
                        if directory in seen:
                            if seen[directory] != cfg.resolved():
                                problems.append(f"two cells share {directory} with different configs")
                            continue  # the same cell listed twice (e.g. a grid value equal to the default)
                        seen[directory] = cfg.resolved()
                        cells.append(Cell(cfg, directory, "absent"))
    # Files and directories the cells name (data, model, tokenizer), as `clue-adv validate` checks them:
    # a wrong path fails here, not in the middle of the sweep.
    checked: set[str] = set()
    for cell in cells:
        c = cell.config
        key = json.dumps([c.task, c.data.model_dump(), c.model.model_dump(), c.max_length, c.logging.trackers])
        if key not in checked:
            checked.add(key)
            problems += [f"{cell.config.experiment}/{cell.config.task}: {p}" for p in check_paths(cell.config)]
    for data in raw_cells:
        fields = ("task", "data", "model", "max_length", "logging")
        key = json.dumps([data.get(f) for f in fields], default=str)
        if key not in checked:
            checked.add(key)
            problems += [f"{data.get('experiment')}/{data.get('task')}: {p}" for p in check_raw_paths(data)]
    problems = list(dict.fromkeys(problems))
    for cell in cells:
        try:
            state = existing_state(cell.config, cell.directory)
        except ConfigError as e:
            problems.append(e.message)
            continue
        if state == "incomplete":
            state = (read_summary(cell.directory) or {}).get("status", "running")
        cell.state = state
    if problems:
        raise ConfigError(f"{source}: {len(problems)} problem(s)", problems)
    if not cells:
        raise ConfigError(f"{source}: the grid is empty")
    return SweepPlan(sweep, str(source), cells)


def load_plan(path: str | Path, output_dir: str | Path | None = None, overrides: list[str] | None = None) -> SweepPlan:
    return plan_sweep(load_sweep(path), path, output_dir, overrides)


# --------------------------------------------------------------------------------------------------
# Running


@dataclass
class CellResult:
    cell: Cell
    status: str  # completed | skipped | failed | interrupted
    seconds: float = 0.0
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepResult:
    results: list[CellResult]
    interrupted: bool = False

    def by_status(self, status: str) -> list[CellResult]:
        return [r for r in self.results if r.status == status]

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.by_status("failed") else 0


MAX_JOBS = 256  # parallel local workers; more is a typo (each gets a process and a share of the cores)


def core_sets(cores: list[int], jobs: int) -> list[list[int]]:
    """Split the cores between `jobs` workers: disjoint sets of (nearly) equal size; with more workers
    than cores, workers share cores round-robin."""
    if jobs <= len(cores):
        size, extra = divmod(len(cores), jobs)
        out, start = [], 0
        for k in range(jobs):
            n = size + (1 if k < extra else 0)
            out.append(cores[start : start + n])
            start += n
        return out
    return [[cores[k % len(cores)]] for k in range(jobs)]


def available_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


class SweepProgress:
    """One bar for the sweep (runs done / total, ETA) on a terminal; plain lines otherwise."""

    def __init__(self, total: int, already_done: int, console: Console, show: bool | None = None) -> None:
        self.console = console
        self.bar = console.is_terminal if show is None else show
        self.total = total
        self.done = already_done
        self._started_with = already_done
        self._t0 = time.perf_counter()
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> SweepProgress:
        self._t0 = time.perf_counter()
        if self.bar:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]sweep"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("runs"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task("sweep", total=self.total, completed=self.done)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def eta(self) -> str:
        finished = self.done - self._started_with
        if finished <= 0:
            return "?"
        seconds = (time.perf_counter() - self._t0) / finished * (self.total - self.done)
        return _duration(seconds)

    def started(self, cell: Cell, where: str = "") -> None:
        if not self.bar:
            self.console.print(f"[{self.done}/{self.total}] start {cell.name}{where}", highlight=False, soft_wrap=True)

    def finished(self, result: CellResult) -> None:
        self.done += 1
        acc = result.summary.get("best_dev_accuracy")
        detail = f" best dev {100 * acc:.2f}" if result.status == "completed" and acc is not None else ""
        if result.error:
            detail += f" ({result.error})"
        line = f"[{self.done}/{self.total}] {result.status} {result.cell.name}{detail} in {_duration(result.seconds)}"
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done)
            style = {"completed": "green", "failed": "red", "interrupted": "yellow"}.get(result.status, "")
            self._progress.console.print(f"[{style}]{line}[/]" if style else line, highlight=False, soft_wrap=True)
        else:
            eta = f"; ETA {self.eta()}" if result.status != "interrupted" else ""
            self.console.print(line + eta, highlight=False, soft_wrap=True)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _summary_stamp(directory: Path) -> int | None:
    """summary.json's modification time, to tell afterwards whether a run attempt wrote it."""
    try:
        return (directory / "summary.json").stat().st_mtime_ns
    except OSError:
        return None


def record_setup_failure(cell: Cell, error: str, before: int | None = None) -> dict[str, Any] | None:
    """Leave a trace of a cell that failed before its run started (missing data file, bad tokenizer): train
    writes its run directory only once setup succeeded, so without this the report and `sweep --status`
    would show the cell as never started. `before`: `_summary_stamp` taken before the attempt; a summary.json
    written since then is the attempt's own account and is kept. A directory holding another config's run
    is never touched. Returns the summary written, or None."""
    directory = cell.directory
    if before is not None and _summary_stamp(directory) != before:
        return None
    if run_lock_held(directory):  # another process is training there (e.g. refused by its lock): not ours to mark
        return None
    stored = read_config(directory)
    if stored is not None and stored_identity(stored) != identity(cell.config.resolved()):
        return None
    summary = {
        "status": "failed",
        "error": error,
        "failed_stage": "setup",
        "experiment": cell.config.experiment,
        "task": cell.config.task,
        "strategy": cell.config.strategy.name,
        "strategy_tag": directory.parent.name,
        "seed": cell.config.seed,
    }
    try:
        if stored is None:
            atomic_write_text(directory / "config.yaml", dump_config(cell.config))
        atomic_write_json(directory / "summary.json", summary)
    except OSError:  # e.g. the output folder cannot be created: the sweep's own message says so already
        return None
    return summary


def _classify(
    cell: Cell, returncode: int | None, seconds: float, log: Path | None = None, fallback: str | None = None
) -> CellResult:
    """What a finished worker left in its run directory; a run that died without saying so (killed,
    out of host memory) still says `running` and is marked failed here, so the directory is honest.
    `fallback`: how the worker ended, where its exit code says nothing (a job that left the queue)."""
    summary = read_summary(cell.directory) or {}
    status = summary.get("status")
    if returncode == 0 and status == "completed":
        return CellResult(cell, "completed", seconds, summary=summary)
    if status == "interrupted" or returncode in (130, -signal.SIGINT):
        return CellResult(cell, "interrupted", seconds, summary.get("error"), summary)
    error = summary.get("error") if status == "failed" else None
    if error is None:
        tail = _log_tail(log)
        how = f"exit code {returncode}" if returncode is None or returncode >= 0 else f"signal {-returncode}"
        error = fallback or f"worker ended with {how}" + (f": {tail}" if tail else "")
        if status == "running":
            summary.update(status="failed", error=error)
            atomic_write_json(cell.directory / "summary.json", summary)
        elif status is None:  # the worker failed before its run started (setup): no summary yet
            summary = record_setup_failure(cell, error) or summary
    return CellResult(cell, "failed", seconds, error, summary)


def plan_data_problems(plan: SweepPlan) -> list[str]:
    """What `clue-adv validate` finds inside the local data files of the plan's cells (labels.json's size for
    the task, a malformed line, an unknown label, an empty split), read once per distinct data source; each
    problem names the cells that would read that data."""
    groups: dict[tuple[Any, ...], list[Cell]] = {}
    for cell in plan.cells:
        c, d = cell.config, cell.config.data
        key = (c.task, d.path, d.train_file, d.dev_file, d.max_train_samples, d.max_eval_samples)
        groups.setdefault(key, []).append(cell)
    problems: list[str] = []
    for cells in groups.values():
        found = check_data(cells[0].config)
        if not found:
            continue
        names = ", ".join(c.name for c in cells[:3]) + (f" and {len(cells) - 3} more" if len(cells) > 3 else "")
        problems += [f"{p} (cell{'s' if len(cells) > 1 else ''} {names})" for p in found]
    return list(dict.fromkeys(problems))


def _log_tail(log: Path | None) -> str:
    """The worker's error line (it prints `error: ...`), else its last line; cut to one readable line."""
    if log is None or not log.is_file():
        return ""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    errors = [ln.removeprefix("error: ") for ln in lines if ln.startswith("error: ")]
    line = errors[-1] if errors else (lines[-1] if lines else "")
    return line if len(line) <= 300 else line[:300] + "…"


# Whether this process has trained a run already: on the CPU a run's peak memory is the process's peak resident
# memory, which never goes down by itself, so a later run in the same process would report an earlier run's peak
# as its own unless that peak is reset (Linux: /proc/self/clear_refs) before each run.
_trained_in_this_process = False
SHARED_PROCESS_MEMORY_NOTE = (
    "not measured: this run shared its process with an earlier run (a one-job sweep), and on the CPU peak "
    "memory is the process's peak resident memory, which includes the earlier runs' (this system cannot reset "
    "it between runs); run with --jobs 2 or more (one process per run) to measure it"
)
_PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (VmHWM) to its current one, which train.py then reports as the
    run's peak; False where that is not possible (not Linux, a kernel or sandbox that refuses it)."""
    from clue_adv.train import process_peak_rss_mb

    try:
        # "5" resets only the high-water mark; it leaves page-table bits and the memory itself alone.
        _PROC_CLEAR_REFS.write_text("5", encoding="ascii")
    except OSError:
        return False
    return process_peak_rss_mb() is not None


def _correct_cpu_peak_memory(directory: Path, summary: dict[str, Any], shared: bool, reset: bool) -> dict[str, Any]:
    """A completed CPU run whose process's peak could not be reset before it (`reset` False) and that shared its
    process with an earlier run (`shared`): peak_memory_mb becomes null, with peak_memory_note saying why. After
    a reset, train.py's figure (VmHWM since the reset) is already the run's own; CUDA peaks are reset per run."""
    on_cpu = str(summary.get("device", "")).startswith("cpu")
    if reset or not shared or not on_cpu or summary.get("status") != "completed":
        return summary
    if summary.get("peak_memory_mb") is None:
        return summary
    summary = {**summary, "peak_memory_mb": None, "peak_memory_note": SHARED_PROCESS_MEMORY_NOTE}
    atomic_write_json(directory / "summary.json", summary)
    return summary


def _run_in_process(cells: list[Cell], force: bool, progress: SweepProgress, console: Console) -> SweepResult:
    import torch

    from clue_adv.train import train

    global _trained_in_this_process
    results: list[CellResult] = []
    for cell in cells:
        progress.started(cell)
        start = time.perf_counter()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # each run reports its own peak, not the sweep's so far
        reset = _reset_peak_rss()  # likewise on the CPU, where the system allows it
        before = _summary_stamp(cell.directory)
        # Any attempt counts, a failed one too: it may have raised the process's peak before failing.
        shared, _trained_in_this_process = _trained_in_this_process, True
        try:
            outcome = train(cell.config, force=force, show_progress=progress.bar or None, console=console)
        except KeyboardInterrupt:
            result = CellResult(cell, "interrupted", time.perf_counter() - start)
            results.append(result)
            progress.finished(result)
            return SweepResult(results, interrupted=True)
        except RunFailed as e:
            result = CellResult(cell, "failed", time.perf_counter() - start, e.message)
        except ClueAdvError as e:  # e.g. a data file missing for one task: the other cells still run
            result = CellResult(cell, "failed", time.perf_counter() - start, str(e))
            result.summary = record_setup_failure(cell, str(e), before) or {}
        except Exception as e:  # a bug in one strategy must not stop the sweep; its summary says failed
            result = CellResult(cell, "failed", time.perf_counter() - start, f"{type(e).__name__}: {e}")
            result.summary = record_setup_failure(cell, result.error, before) or {}
        else:
            status = "skipped" if outcome.skipped else "completed"
            summary = outcome.summary
            if outcome.skipped:
                _trained_in_this_process = shared  # nothing was loaded: the process's peak is unchanged
            else:
                summary = read_summary(outcome.directory) or summary
                summary = _correct_cpu_peak_memory(outcome.directory, summary, shared, reset)
            result = CellResult(cell, status, time.perf_counter() - start, summary=summary)
        results.append(result)
        progress.finished(result)
    return SweepResult(results)


def _run_subprocesses(
    cells: list[Cell], force: bool, jobs: int, devices: list[str] | None, progress: SweepProgress
) -> SweepResult:
    cores = available_cores()
    slots = core_sets(cores, jobs)
    queue = deque(cells)
    running: dict[int, tuple[subprocess.Popen, Cell, float, Path, Any]] = {}
    results: list[CellResult] = []
    interrupted = False
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="clue-adv-sweep-") as tmp:
        try:
            while queue or running:
                for slot in range(jobs):
                    if slot in running or not queue:
                        continue
                    cell = queue.popleft()
                    config_file = Path(tmp) / f"cell-{len(results) + len(running)}-{slot}.yaml"
                    config_file.write_text(dump_config(cell.config), encoding="utf-8")
                    env = dict(os.environ)
                    cpus = slots[slot]
                    env.update(
                        CLUE_ADV_CPUS=",".join(map(str, cpus)),
                        OMP_NUM_THREADS=str(len(cpus)),
                        MKL_NUM_THREADS=str(len(cpus)),
                        TOKENIZERS_PARALLELISM="false",
                        CLUE_ADV_PARENT_PID=str(os.getpid()),
                    )
                    where = ""
                    if devices:
                        env["CUDA_VISIBLE_DEVICES"] = devices[slot % len(devices)]
                        where = f" on device {env['CUDA_VISIBLE_DEVICES']}"
                    cell.directory.mkdir(parents=True, exist_ok=True)
                    log = cell.directory / "train.log"
                    log.unlink(missing_ok=True)  # a symlink planted here is removed, never written through
                    log_file = open_in_run_dir(log, "w")  # closed when the worker ends
                    command = [sys.executable, "-m", "clue_adv.sweep", str(config_file)]
                    command += ["--force"] if force else []
                    # Own session: Ctrl-C reaches the sweep only, which forwards it once to each worker.
                    proc = subprocess.Popen(
                        command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
                    )
                    running[slot] = (proc, cell, time.perf_counter(), log, log_file)
                    progress.started(cell, where)
                for slot, (proc, cell, start, log, log_file) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    log_file.close()
                    del running[slot]
                    result = _classify(cell, proc.returncode, time.perf_counter() - start, log)
                    results.append(result)
                    progress.finished(result)
                time.sleep(0.2)
        except KeyboardInterrupt:
            interrupted = True
            for proc, *_ in running.values():
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 60
            for slot, (proc, cell, start, log, log_file) in running.items():
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log_file.close()
                result = _classify(cell, proc.returncode, time.perf_counter() - start, log)
                if result.status == "failed" and proc.returncode in (130, -signal.SIGINT, -signal.SIGKILL):
                    result.status = "interrupted"
                results.append(result)
                progress.finished(result)
    return SweepResult(results, interrupted)


def run_cell(
    resolved: dict[str, Any], force: bool = False, threads: int | None = None, cwd: str | None = None
) -> dict[str, Any]:
    """One cell, in whatever process runs it (a submitit job); picklable by reference. `threads`: the
    job's CPU allocation; torch would otherwise start one thread per core it can see on the node. `cwd`:
    the sweep's working directory, which relative paths in the config (data.path) are relative to."""
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    import torch

    from clue_adv.train import train

    if threads:
        torch.set_num_threads(max(1, min(threads, len(available_cores()))))
    cfg = RunConfig.model_validate(resolved)
    directory = run_dir(cfg).resolve()
    before = _summary_stamp(directory)
    try:
        outcome = train(cfg, force=force, show_progress=False)
    except RunFailed as e:
        return {"status": "failed", "directory": str(directory), "error": e.message}
    except ClueAdvError as e:  # setup failed (data, tokenizer): the run directory still says so
        record_setup_failure(Cell(cfg, directory, "absent"), str(e), before)
        return {"status": "failed", "directory": str(directory), "error": str(e)}
    return {"status": "skipped" if outcome.skipped else "completed", "directory": str(outcome.directory)}


# --------------------------------------------------------------------------------------------------
# Slurm through submitit: sbatch parameters, what each run directory records, the queue, status

SLURM_RECORD = "slurm.json"  # in a run directory: the job last submitted for it (id, log files, submitter)
SLURM_LOGS = {"stdout": "slurm.out", "stderr": "slurm.err"}  # links beside the run's files to that job's logs
# A job that left the queue without a result file: how long to wait for the file anyway (a shared file
# system can show it late) before calling the run failed; and how often to ask squeue.
RESULT_GRACE_S = 15.0
QUEUE_POLL_S = 5.0


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ClueAdvError("--executor slurm needs submitit: pip install 'clue-adv[slurm]'") from None
    return submitit


def slurm_folder(plan: SweepPlan) -> Path:
    """Where submitit keeps the job scripts, pickles and logs (`<folder>/<job id>/`)."""
    s = plan.sweep.slurm
    return (Path(s.log_dir) if s.log_dir else plan.output_dir / plan.experiments[0] / "slurm").absolute()


def sbatch_parameters(plan: SweepPlan) -> dict[str, Any]:
    """The sweep's `slurm` block as submitit SlurmExecutor parameters (sbatch option names)."""
    s = plan.sweep.slurm
    params: dict[str, Any] = {
        "job_name": f"clue-adv-{plan.experiments[0]}",
        "time": s.time_min,
        "cpus_per_task": s.cpus_per_task,
        "gpus_per_node": s.gpus_per_node or None,  # 0: no GPU request at all (CPU partitions may refuse one)
        "mem": f"{s.mem_gb}GB",
        "array_parallelism": s.array_parallelism,
        "partition": s.partition,
        "account": s.account,
        "qos": s.qos,
        "constraint": s.constraint,
        "setup": s.setup or None,
        "additional_parameters": s.additional or None,
    }
    return {k: v for k, v in params.items() if v is not None}


def sbatch_script(plan: SweepPlan, n_tasks: int) -> str:
    """The batch script `--executor slurm` submits for `n_tasks` runs: submitit's own rendering of the
    same parameters, so a dry run shows exactly what sbatch will get."""
    _submitit()
    from submitit.slurm.slurm import _make_sbatch_string

    folder = slurm_folder(plan) / "%j"
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    # One run is submitted as a plain job, more as an array (as submitit's map_array does).
    count = n_tasks if n_tasks > 1 else None
    return _make_sbatch_string(command=command, folder=folder, map_count=count, **sbatch_parameters(plan))


def submitit_executor(plan: SweepPlan, cluster: str) -> Any:
    """A submitit executor configured from the sweep's `slurm` block (`cluster`: slurm, local or debug)."""
    submitit = _submitit()
    executor = submitit.AutoExecutor(folder=slurm_folder(plan) / "%j", cluster=cluster)
    params = sbatch_parameters(plan)
    if cluster == "slurm":
        executor.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
    else:
        import torch

        s = plan.sweep.slurm
        executor.update_parameters(
            name=params["job_name"],
            timeout_min=s.time_min,
            cpus_per_task=s.cpus_per_task,
            gpus_per_node=min(s.gpus_per_node, torch.cuda.device_count()),  # local: only GPUs it can see
            mem_gb=s.mem_gb,
        )
    return executor


def slurm_queue() -> dict[str, str] | None:
    """This user's jobs and array tasks still in the Slurm queue (`123_4` -> PENDING, RUNNING, ...);
    None where squeue is missing or fails, so that nothing is concluded from silence."""
    if shutil.which("squeue") is None:
        return None
    command = ["squeue", "--noheader", "--array", "--format=%i %T"]
    with contextlib.suppress(Exception):
        command += ["--user", getpass.getuser()]
    try:
        listing = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    queue: dict[str, str] = {}
    for line in listing.splitlines():
        job, _, state = line.strip().partition(" ")
        packed = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job)  # pending tasks some versions keep packed
        if not packed:
            queue[job] = state.strip()
            continue
        for part in packed.group(2).split(","):
            low, _, high = part.partition("-")
            for index in range(int(low), int(high or low) + 1):
                queue[f"{packed.group(1)}_{index}"] = state.strip()
    return queue


def read_slurm_record(directory: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((directory / SLURM_RECORD).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("job_id") else None


def _record_submission(cell: Cell, job: Any, cluster: str, folder: Path) -> None:
    """The run directory says which job holds it (for --status and for the next sweep) and links that
    job's stdout/stderr beside its files (the links dangle until the job starts)."""
    directory = cell.directory
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "executor": cluster,
        "job_id": str(job.job_id),
        "folder": str(folder),
        "stdout": str(job.paths.stdout),
        "stderr": str(job.paths.stderr),
        "submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    atomic_write_json(directory / SLURM_RECORD, record)
    for key, name in SLURM_LOGS.items():
        link = directory / name
        with contextlib.suppress(OSError):  # a file system without links: the record still names the logs
            link.unlink(missing_ok=True)
            link.symlink_to(os.path.relpath(record[key], directory))


def in_queue(cells: list[Cell], queue: dict[str, str] | None = None) -> dict[Path, tuple[str, dict[str, Any]]]:
    """Cells whose last Slurm job is still queued or running: directory -> (its queue state, its record).
    Such a cell is not submitted again: a second job would write into the same directory."""
    records = {}
    for cell in cells:
        record = read_slurm_record(cell.directory)
        if record and record.get("executor") == "slurm":
            records[cell.directory] = record
    if not records:
        return {}
    queue = slurm_queue() if queue is None else queue
    if not queue:
        return {}
    return {d: (queue[r["job_id"]], r) for d, r in records.items() if r["job_id"] in queue}


@dataclass
class CellStatus:
    cell: Cell
    status: str  # pending | running | completed | failed | interrupted | not started
    detail: str = ""
    job_id: str | None = None


STATUS_ORDER = ("completed", "running", "pending", "failed", "interrupted", "not started")


def sweep_status(plan: SweepPlan) -> list[CellStatus]:
    """What each cell's run directory says, whatever executor ran it; where the directory names a Slurm
    job, squeue tells pending from running, and a run that says `running` although its job has left the
    queue (cancelled, timed out, killed) is failed."""
    records = {c.directory: read_slurm_record(c.directory) for c in plan.cells}
    asks_slurm = any(r and r.get("executor") == "slurm" for r in records.values())
    queue = slurm_queue() if asks_slurm else None
    out = []
    for cell in plan.cells:
        record = records[cell.directory]
        job = record["job_id"] if record else None
        queued = queue.get(job) if queue is not None and job and record.get("executor") == "slurm" else None
        summary = (read_summary(cell.directory) or {}) if cell.state != "absent" else {}
        if queued == "PENDING":
            out.append(CellStatus(cell, "pending", f"job {job} waiting in the queue", job))
        elif queued is not None and cell.state != "running":
            # The job runs but has not started training yet (the previous attempt's summary, if any, is stale).
            out.append(CellStatus(cell, "running", f"job {job} {queued.lower()}, starting", job))
        elif cell.state == "completed":
            acc = summary.get("best_dev_accuracy")
            shown = f"best dev {100 * acc:.2f}" if isinstance(acc, int | float) and math.isfinite(acc) else ""
            out.append(CellStatus(cell, "completed", shown, job))
        elif cell.state in ("failed", "interrupted"):
            out.append(CellStatus(cell, cell.state, str(summary.get("error") or ""), job))
        elif cell.state == "running":
            left = queued is None and queue is not None and record is not None and record.get("executor") == "slurm"
            if left:
                detail = f"job {job} left the queue without finishing (cancelled, timed out or killed); rerun the sweep"
                out.append(CellStatus(cell, "failed", detail, job))
            elif queued is None and stale_running(cell.directory, summary):
                detail = f"{STALE_NOTE}, last update {_age(cell.directory)} ago; rerun the sweep"
                out.append(CellStatus(cell, "interrupted", detail, job))
            else:
                where = f"job {job} {queued.lower()}, " if queued else ""
                out.append(CellStatus(cell, "running", where + f"last update {_age(cell.directory)} ago", job))
        else:
            detail = f"job {job} left the queue before starting" if job and queue is not None else ""
            out.append(CellStatus(cell, "not started", detail, job))
    return out


def _age(directory: Path) -> str:
    times = [p.stat().st_mtime for p in (directory / "metrics.jsonl", directory / "summary.json") if p.is_file()]
    return _duration(time.time() - max(times)) if times else "?"


@contextlib.contextmanager
def _quiet_submitit() -> Any:
    """submitit warns on every failed sacct call (clusters without accounting); the sweep watches the queue
    with squeue itself, so those warnings are noise."""
    import logging

    _submitit()  # importing it configures its logger: first, or the level set here is undone
    logger = logging.getLogger("submitit")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _run_submitit(
    plan: SweepPlan,
    cells: list[Cell],
    force: bool,
    cluster: str,
    progress: SweepProgress,
    console: Console,
    queued: list[tuple[Cell, dict[str, Any]]] | None = None,
) -> SweepResult:
    """Submit `cells` as one job array and wait for it, and for `queued` cells (still in the queue from
    an earlier sweep: collected, not submitted again). A job that leaves the queue without a result
    (scancel, time limit, out of memory) is a failed run; its directory says so and the next sweep reruns it."""
    folder = slurm_folder(plan) / "%j"
    jobs: list[Any] = []
    with _quiet_submitit():
        if cells:
            executor = submitit_executor(plan, cluster)
            n = len(cells)
            try:
                jobs = executor.map_array(
                    run_cell,
                    [c.config.resolved() for c in cells],
                    [force] * n,
                    [plan.sweep.slurm.cpus_per_task] * n,
                    [os.getcwd()] * n,
                )
            except Exception as e:  # sbatch missing or refusing (bad partition, account...): say so, no traceback
                raise ClueAdvError(f"could not submit the job array ({cluster}): {type(e).__name__}: {e}") from None
            for cell, job in zip(cells, jobs, strict=True):
                _record_submission(cell, job, cluster, folder)
            ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
            console.print(
                f"submitted {len(jobs)} run(s) as job {', '.join(ids)} ({cluster}); each run's log: "
                f"{'/'.join(SLURM_LOGS.values())} in its directory",
                highlight=False,
            )
        cells = list(cells)
        if queued:
            from submitit.slurm.slurm import SlurmJob

            for cell, record in queued:
                cells.append(cell)
                jobs.append(SlurmJob(folder=record.get("folder", folder), job_id=record["job_id"], tasks=[0]))
            ids = sorted({r["job_id"].split("_")[0] for _, r in queued})
            console.print(
                f"{len(queued)} run(s) already in the queue (job {', '.join(ids)}): waiting for them, "
                "not submitting them again",
                highlight=False,
            )
        return _wait_for_jobs(cells, jobs, cluster, progress, console)


def _has_result(job: Any) -> bool:
    with contextlib.suppress(OSError):  # touching the folder refreshes a network file system's view of it
        folder = job.paths.result_pickle.parent
        folder.chmod(folder.stat().st_mode)
    return job.paths.result_pickle.exists()


def _wait_for_jobs(
    cells: list[Cell], jobs: list[Any], cluster: str, progress: SweepProgress, console: Console
) -> SweepResult:
    pending = dict(enumerate(jobs))
    starts = {i: time.perf_counter() for i in pending}
    gone: dict[int, float] = {}  # job left the queue (or the scheduler says it ended) without a result file yet
    next_poll = 0.0
    queue: dict[str, str] | None = None
    results: list[CellResult] = []
    try:
        while pending:
            now = time.monotonic()
            if cluster == "slurm" and now >= next_poll:
                # The queue from squeue, not job states from sacct (what submitit asks, and what clusters
                # without accounting do not answer): a job that leaves the queue without a result would
                # otherwise be waited for forever.
                queue = slurm_queue()
                next_poll = now + QUEUE_POLL_S
                if queue is not None:
                    for i, job in pending.items():
                        if str(job.job_id) not in queue:
                            gone.setdefault(i, now)
            for i, job in list(pending.items()):
                cell, seconds = cells[i], time.perf_counter() - starts[i]
                if cluster == "slurm" and queue is not None:
                    ended = _has_result(job)
                else:  # submitit's own check (local processes; sacct where squeue failed)
                    ended = job.done()
                if ended and _has_result(job):
                    try:
                        outcome = job.result()
                    except Exception as e:  # the job itself failed (exception, timeout, preemption, node failure)
                        result = _classify(cell, 1, seconds)
                        if result.status == "failed" and not result.summary.get("error"):
                            result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][-300:]}"
                    else:
                        result = _classify(cell, 0 if outcome["status"] != "failed" else 1, seconds)
                        if outcome["status"] == "skipped":
                            result.status = "skipped"
                elif ended or i in gone:
                    if time.monotonic() - gone.setdefault(i, time.monotonic()) < RESULT_GRACE_S:
                        continue
                    why = f"job {job.job_id} ended without a result (cancelled, timed out, out of memory, node failure)"
                    tail = _log_tail(Path(job.paths.stderr))
                    why += f"; its log ends: {tail}" if tail else ""
                    result = _classify(cell, 1, seconds, fallback=why)
                else:
                    continue
                del pending[i]
                results.append(result)
                progress.finished(result)
            if pending:
                time.sleep(1.0 if cluster == "slurm" else 0.2)
    except KeyboardInterrupt:
        ids = sorted({str(j.job_id).split("_")[0] for j in pending.values()})
        console.print(
            f"stopped waiting; {len(pending)} run(s) keep going in job {', '.join(ids)} "
            f"(scancel {' '.join(ids)} to stop them; rerun the sweep to collect and resume)",
            highlight=False,
        )
        return SweepResult(results, interrupted=True)
    return SweepResult(results)


def submission(plan: SweepPlan, force: bool = False) -> tuple[list[Cell], dict[Path, tuple[str, dict[str, Any]]]]:
    """The cells a sweep starts now, and those it leaves alone because their Slurm job from an earlier
    sweep is still queued or running (directory -> (queue state, record)); with `--force` too, since a
    second job would write into the same directory."""
    candidates = list(plan.cells) if force else [c for c in plan.cells if not c.done]
    queued = in_queue(candidates)
    return [c for c in plan.to_run(force) if c.directory not in queued], queued


MANIFEST = SWEEP_MANIFEST


def write_manifests(plan: SweepPlan) -> list[Path]:
    """Write `<output>/<experiment>/sweep.json` for each experiment of the plan: every planned cell (its run
    directory relative to the experiment's, and its identity), so that the report can tell a cell that never
    started from one that was never planned. Replaced by each sweep: the latest plan is the plan."""
    written = []
    for experiment in plan.experiments:
        cells = [c for c in plan.cells if c.config.experiment == experiment]
        # Cells of one experiment share <output>/<experiment>/ (run_dir's layout); taken from a cell, not
        # plan.output_dir, so that a cell's own output_dir is honoured.
        root = cells[0].directory.parents[2]
        entries = []
        for cell in cells:
            try:
                relative = cell.directory.relative_to(root).as_posix()
            except ValueError:  # a cell with another output_dir: its own manifest is not written here
                continue
            entries.append(
                {
                    "run_dir": relative,
                    "task": cell.config.task,
                    "strategy": cell.config.strategy.name,
                    "strategy_tag": cell.directory.parent.name,
                    "seed": cell.config.seed,
                    "identity": identity(cell.config.resolved()),
                }
            )
        manifest = {"experiment": experiment, "sweep": plan.source, "written_at": _now(), "cells": entries}
        try:
            atomic_write_json(root / MANIFEST, manifest)
        except OSError as e:
            raise ClueAdvError(f"cannot write the sweep manifest {root / MANIFEST}: {e.strerror or e}") from None
        written.append(root / MANIFEST)
    return written


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run_sweep(
    plan: SweepPlan,
    *,
    force: bool = False,
    jobs: int | None = None,
    devices: list[str] | None = None,
    executor: str = "local",
    console: Console | None = None,
    show_progress: bool | None = None,
) -> SweepResult:
    """Run the cells that are not completed yet (all with `force`). Failures do not stop the sweep."""
    console = console or Console(stderr=True)
    if executor not in EXECUTORS:
        raise ClueAdvError(f"--executor: unknown executor {executor!r} (valid: {', '.join(EXECUTORS)})")
    if devices is not None and not devices:
        raise ClueAdvError("--devices: give device ids, e.g. --devices 0,1,2,3")
    jobs = jobs if jobs is not None else (len(devices) if devices else 1)
    if jobs < 1:
        raise ClueAdvError("--jobs must be at least 1")
    if jobs > MAX_JOBS:
        raise ClueAdvError(f"--jobs {jobs}: at most {MAX_JOBS} runs at once")
    if executor != "local" and (devices or jobs > 1):
        console.print(
            f"note: --devices/--jobs place runs on this machine; with --executor {executor} the scheduler places "
            "them (resources: the sweep's `slurm:` block)",
            highlight=False,
        )
    elif devices and jobs > len(devices):
        console.print(
            f"note: --jobs {jobs} over {len(devices)} device(s): up to {math.ceil(jobs / len(devices))} runs share "
            "a GPU (its memory and time); one run per device is --jobs equal to the number of devices",
            highlight=False,
        )
    write_manifests(plan)
    todo, queued = submission(plan, force)
    skipped = [CellResult(c, "skipped") for c in plan.cells if c not in todo and c.directory not in queued]
    if queued and executor != "slurm":
        ids = sorted({record["job_id"].split("_")[0] for _, record in queued.values()})
        console.print(
            f"{len(queued)} run(s) are still in the Slurm queue (job {', '.join(ids)}): not run here; "
            f"see `clue-adv sweep --status`, or scancel {' '.join(ids)} and rerun",
            highlight=False,
        )
    progress = SweepProgress(len(plan.cells), len(skipped), console, show_progress)
    with progress:
        if executor == "slurm" and (todo or queued):
            waiting = [(c, queued[c.directory][1]) for c in plan.cells if c.directory in queued]
            result = _run_submitit(plan, todo, force, "slurm", progress, console, waiting)
        elif not todo:
            result = SweepResult([])
        elif executor != "local":
            result = _run_submitit(plan, todo, force, "local", progress, console)
        elif jobs == 1 and not devices:
            with sigterm_as_interrupt():
                result = _run_in_process(todo, force, progress, console)
        else:
            result = _run_subprocesses(todo, force, jobs, devices, progress)
    result.results = skipped + result.results
    return result


# --------------------------------------------------------------------------------------------------
# The worker process: `python -m clue_adv.sweep CONFIG.yaml [--force]`


def _stop_with_the_sweep() -> None:
    """Ask the kernel to send SIGINT to this worker when the sweep that started it dies, even by kill -9.

    Workers run in their own session (so a terminal's Ctrl-C reaches the sweep only), so nothing else would
    stop them: they would train on, and a rerun of the sweep would start a second writer into the same run
    directory. SIGINT, not SIGKILL: the run is then marked interrupted with whole files, and the next sweep
    reruns it. Linux only (prctl); the sweep runs its workers from its main thread, as PR_SET_PDEATHSIG needs.
    """
    parent = os.environ.get("CLUE_ADV_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGINT)
    if os.getppid() != int(parent):  # the sweep died before prctl took effect
        raise KeyboardInterrupt


def worker_main(argv: list[str]) -> int:
    """Train one resolved config; exit 0 completed, 1 failed, 2 bad input, 130 interrupted."""
    handle_sigint()
    try:
        _stop_with_the_sweep()
    except KeyboardInterrupt:
        return 130
    cpus = os.environ.get("CLUE_ADV_CPUS")
    if cpus:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    import torch

    if cpus:
        torch.set_num_threads(len(cpus.split(",")))
    from clue_adv.config import load_config
    from clue_adv.train import train

    console = Console(stderr=True, soft_wrap=True)
    # Into the cell's train.log: which cores and GPU this worker was given, to check --devices/--jobs pinning.
    with contextlib.suppress(AttributeError, OSError):
        affinity = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        console.print(
            f"worker: cpus {affinity} ({torch.get_num_threads()} threads), "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}",
            highlight=False,
            markup=False,
        )
    try:
        cfg = load_config(argv[0])
        with sigterm_as_interrupt():
            outcome = train(cfg, force="--force" in argv[1:], show_progress=False, console=console)
    except RunFailed as e:
        console.print(f"error: {e}", highlight=False, markup=False)
        return 1
    except ClueAdvError as e:
        console.print(f"error: {e}", highlight=False, markup=False)
        return e.exit_code
    except KeyboardInterrupt:
        console.print("interrupted", highlight=False)
        return 130
    console.print(f"done: {outcome.directory}", highlight=False, markup=False)
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
