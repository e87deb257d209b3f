"""A sweep file's schema: a base run config and what varies (tasks, strategy blocks, grid, seeds), and the Slurm
resources of each run. `base`, and the paths its `overrides`, `per_task` and `grid` name to read (data.path, a
local model), are relative to the sweep file's directory, as the paths inside each run config are relative to
that config's: a sweep file works from any working directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, ValidationError, field_validator

from clue_adv.config import (
    MAX_SEED,
    RunConfig,
    StrategyBlock,
    check_key,
    format_validation_errors,
    load_yaml,
    paths_from_file,
)
from clue_adv.errors import ConfigError
from clue_adv.schema import StrictModel

Task = Literal["tnews", "iflytek"]
# Fields a sweep sets through its own keys; varying them through `grid`/`overrides` would break naming.
RESERVED = {
    "task": "tasks",
    "seed": "seeds",
    "experiment": "experiment",
    "output_dir": "output_dir",
}
# Far past any real study (each run is a fine-tuning, minutes to hours of GPU time) but small
# enough that expanding and validating the plan stays quick: a typo like `seeds: 200000` fails at once
# instead of hanging `--dry-run` or exhausting memory.
MAX_SEEDS = 1000
MAX_RUNS = 100_000


def reserved_key_problem(key: str) -> str | None:
    """Why a dotted run-config key cannot be set through `overrides`, `per_task` or `--set` (None: it can)."""
    head = key.split(".")[0]
    if head in RESERVED:
        return f"set it with the sweep's `{RESERVED[head]}` field"
    if head == "strategy":
        return "strategy fields belong in `strategies` blocks (or `grid`)"
    return check_key(RunConfig, key)


def _settable(key: str) -> str:
    if problem := reserved_key_problem(key):
        raise ValueError(problem)
    return key


RunKey = Annotated[str, AfterValidator(_settable)]  # a dotted run-config field, e.g. `optim.lr`


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
    strategies: list[StrategyBlock] | None = Field(
        None,
        description="Strategy blocks (`name` plus parameters, as in a run config's `strategy`); default: the "
        "base's strategy. Include `{name: none}` for the baseline the report compares against.",
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Dotted key -> values; every combination is crossed with the rest. `fgm.epsilon` varies the "
        "fgm blocks, `strategy.epsilon` every block that has `epsilon`, `optim.lr` every cell.",
    )
    overrides: dict[RunKey, Any] = Field(
        default_factory=dict,
        description="Dotted key -> value applied to every cell (e.g. a tiny model), deep-merged like a further "
        "`--config` file: `data: {max_train_samples: 200}` changes that field and keeps the base's `data.path`. "
        "`{task}` in a string value is replaced by the cell's task (data.path: data/clue/{task}).",
    )
    per_task: dict[Task, dict[RunKey, Any]] = Field(
        default_factory=dict,
        description="Task -> {dotted key: value} applied to that task's cells only, deep-merged like `overrides`.",
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


def load_sweep(path: str | Path) -> SweepConfig:
    path = Path(path)
    data = load_yaml(path)
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as e:
        problems = format_validation_errors(e, SweepConfig)
        raise ConfigError(f"{path}: {len(problems)} problem(s)", problems) from None
    # the paths its run fields name to read, from the sweep file's folder (config.paths_from_file)
    folder = path.parent
    per_task = {task: paths_from_file(block, folder) for task, block in sweep.per_task.items()}
    resolved = {"overrides": paths_from_file(sweep.overrides, folder), "grid": paths_from_file(sweep.grid, folder)}
    return sweep.model_copy(update={**resolved, "per_task": per_task})
