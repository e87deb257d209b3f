"""Experiment trackers (`logging.trackers`): TensorBoard, Weights & Biases and MLflow as mirrors of metrics.jsonl.

metrics.jsonl stays the run's record (the report reads it); every record written there also goes to each configured
tracker, its numeric fields as scalars named `<type>/<field>` (`train/loss`, `eval/accuracy`) at the record's step.
Strings, lists, flags and nulls (a non-finite value is written as null) are not scalars and stay in metrics.jsonl
only; nested blocks are flattened (`a/b`).

One tracker run per run directory, named after it (`<task>/<strategy-tag>/seed-<k>`), grouped by the experiment:

    tensorboard   event files in <run>/tensorboard/ (`tensorboard --logdir <output_dir>/<experiment>`)
    wandb         project $WANDB_PROJECT (default `clue-adv`), group = experiment, files in <run>/wandb/;
                  WANDB_MODE (e.g. offline) and the login are the user's
    mlflow        experiment = experiment name, at MLFLOW_TRACKING_URI when it is set, else in a SQLite store in the
                  output directory, <output_dir>/mlflow.db (artifacts: <output_dir>/mlartifacts), so a sweep's runs
                  share one store next to their run directories and nothing lands in the working directory; the
                  config as params, the run directory as a tag

A resumed run (checkpoint.every_epoch) continues the same tracker runs (wandb's and MLflow's run ids are kept in
<run>/trackers.json). metrics.jsonl was cut back to the checkpoint and the steps after it are logged again:
TensorBoard purges the events after the checkpoint's step (SummaryWriter's purge_step), wandb drops steps below
its run's current step, and this module skips the MLflow steps already there, so each tracker ends with the
records of metrics.jsonl once. A tracker that is new to a resumed run (turned on since: trackers are not part of
the run's identity) first receives the records metrics.jsonl already holds. A run started over (`--force`, no
usable checkpoint) starts new tracker runs, and its old TensorBoard events are removed.

The packages are optional extras: a tracker whose package is missing is a config error at validation
(`missing_packages`), not a failure mid-run. A tracker that fails mid-run (a network error) is dropped with a note;
the run goes on, and metrics.jsonl has every record.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import yaml

from clue_adv.config import RunConfig
from clue_adv.errors import ClueAdvError
from clue_adv.rundir import JsonlWriter, atomic_write_json, output_root, read_jsonl

try:
    import fcntl
except ImportError:  # no flock (Windows): MLflow's store setup goes unserialised there
    fcntl = None  # type: ignore[assignment]

# tracker name -> the module it imports; each is also the name of the pip extra that installs it
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
TENSORBOARD_DIR = "tensorboard"
IDS_FILE = "trackers.json"  # wandb/MLflow run ids, so that a resumed run continues the same tracker runs
WANDB_DEFAULT_PROJECT = "clue-adv"
_MLFLOW_BATCH = 100  # MLflow takes at most 100 params per log_batch call
_MLFLOW_PARAM_CHARS = 500  # the longest param value every MLflow version accepts
# Without MLFLOW_TRACKING_URI: MLflow's own default is a store in the current directory (./mlruns, or ./mlflow.db
# from MLflow 3.7), wherever the command was started. The runs' output directory is predictable instead. SQLite,
# not a ./mlruns-style file store: MLflow 3.13+ refuses file stores unless MLFLOW_ALLOW_FILE_STORE is set.
MLFLOW_STORE = "mlflow.db"
MLFLOW_ARTIFACTS = "mlartifacts"
MLFLOW_LOCK = ".mlflow.lock"


def _installed(module: str) -> bool:
    if module in sys.modules:  # imported already (or blocked: None)
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_packages(trackers: Iterable[str]) -> list[str]:
    """One problem per configured tracker whose package is not installed, naming the extra that installs it."""
    return [
        f"logging.trackers: '{name}' needs the {TRACKER_MODULES[name]} package, which is not installed: "
        f"pip install 'clue-adv[{name}]'"
        for name in trackers
        if name in TRACKER_MODULES and not _installed(TRACKER_MODULES[name])
    ]


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics.jsonl record's numeric fields as tracker scalars: `<type>/<field>`, nested blocks flattened."""
    out: dict[str, float] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                add(f"{prefix}/{key}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[prefix] = float(value)  # non-finite: null in metrics.jsonl, so not a point here either

    kind = str(record.get("type", "metrics"))
    for key, value in record.items():
        if key not in ("type", "step"):
            add(f"{kind}/{key}", value)
    return out


def run_name(directory: Path) -> str:
    """The run's name in a tracker: its directory under the experiment, `<task>/<strategy-tag>/seed-<k>`."""
    return "/".join(directory.parts[-3:])


class Tracker(Protocol):
    new: bool  # True when this tracker run has none of the run's earlier records (they are replayed to it)

    def log(self, values: dict[str, float], step: int | None) -> None: ...

    def close(self, status: str) -> None: ...


class TensorBoardTracker:
    """Event files in <run>/tensorboard/ through torch's SummaryWriter."""

    def __init__(self, cfg: RunConfig, directory: Path, resumed_at_step: int | None, ids: dict[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        log_dir = directory / TENSORBOARD_DIR
        if resumed_at_step is None:  # started over: the earlier attempt's curves are not this run's
            _remove(log_dir)
        self.new = not any(log_dir.glob("events.out.tfevents.*"))
        # On resume, events logged after the checkpoint's step are hidden (they are logged again from there).
        purge_step = None if self.new or resumed_at_step is None else resumed_at_step + 1
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        if self.new:
            config = yaml.safe_dump(cfg.resolved(), sort_keys=False, allow_unicode=True)
            self.writer.add_text("config", "    " + config.replace("\n", "\n    "))  # indented: a code block

    def log(self, values: dict[str, float], step: int | None) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self, status: str) -> None:
        self.writer.close()


class WandbTracker:
    """A Weights & Biases run: project $WANDB_PROJECT (default clue-adv), group = experiment, files in <run>/wandb/."""

    def __init__(self, cfg: RunConfig, directory: Path, resumed_at_step: int | None, ids: dict[str, str]) -> None:
        import wandb

        run_id = ids.get("wandb") if resumed_at_step is not None else None
        self.new = run_id is None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or WANDB_DEFAULT_PROJECT,
            group=cfg.experiment,
            name=run_name(directory),
            tags=[cfg.task, cfg.strategy.name],
            config=cfg.resolved(),
            dir=str(directory),
            id=run_id,
            resume="allow" if run_id else None,
        )
        ids["wandb"] = self.run.id

    def log(self, values: dict[str, float], step: int | None) -> None:
        # Steps below the run's current one (logged before an interruption, logged again on resume) are dropped by
        # wandb with a warning: the values are the same, as a resumed run repeats its steps exactly.
        self.run.log(values, step=step)

    def close(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "completed" else 1)


class MlflowTracker:
    """An MLflow run in the experiment named like the run's, through MlflowClient (no global active run, so the
    runs of a sweep in one process do not meet)."""

    STATUS = {"completed": "FINISHED", "interrupted": "KILLED"}  # anything else: FAILED

    def __init__(self, cfg: RunConfig, directory: Path, resumed_at_step: int | None, ids: dict[str, str]) -> None:
        root = output_root(directory).resolve()
        self.tracking_uri = mlflow_tracking_uri(directory)
        # in the default store, new experiments keep their artifacts beside it (MLflow's default: the cwd)
        self._artifacts = (root / MLFLOW_ARTIFACTS).as_uri() if self.tracking_uri is not None else None
        # MLflow before 3.10 creates an empty ./mlruns (its default artifact root) when it opens a SQLite store
        stray = Path("mlruns")
        stray_existed = stray.exists()
        # The first process to open a SQLite store creates its tables; two at once fail ("duplicate column"), which
        # would stop a parallel sweep's runs. The runs sharing an output directory take turns until their MLflow
        # run exists; logging afterwards is safe concurrently (SQLite's own locking).
        with _exclusive(root / MLFLOW_LOCK):
            self._start(cfg, directory, resumed_at_step, ids)
        if self.tracking_uri is not None and not stray_existed:
            _remove_if_empty(stray)

    def _start(self, cfg: RunConfig, directory: Path, resumed_at_step: int | None, ids: dict[str, str]) -> None:
        import mlflow

        self.client = mlflow.MlflowClient(tracking_uri=self.tracking_uri)
        run_id = ids.get("mlflow") if resumed_at_step is not None else None
        self.new = run_id is None
        self.logged: dict[str, float] = {}  # metric -> the highest step the run has already (a resumed run)
        if run_id is not None:
            self.client.update_run(run_id, status="RUNNING")
            for key in self.client.get_run(run_id).data.metrics:
                self.logged[key] = max((m.step for m in self.client.get_metric_history(run_id, key)), default=-1)
        else:
            experiment = self.client.get_experiment_by_name(cfg.experiment)
            if experiment is not None:
                experiment_id = experiment.experiment_id
            else:
                try:
                    experiment_id = self.client.create_experiment(cfg.experiment, artifact_location=self._artifacts)
                except mlflow.exceptions.MlflowException:  # another run of the sweep created it meanwhile
                    experiment_id = self.client.get_experiment_by_name(cfg.experiment).experiment_id
            tags = {"task": cfg.task, "strategy": cfg.strategy.name, "seed": str(cfg.seed), "run_dir": str(directory)}
            run_id = self.client.create_run(experiment_id, run_name=run_name(directory), tags=tags).info.run_id
            params = [mlflow.entities.Param(k, v[:_MLFLOW_PARAM_CHARS]) for k, v in _flat(cfg.resolved()).items()]
            for i in range(0, len(params), _MLFLOW_BATCH):
                self.client.log_batch(run_id, params=params[i : i + _MLFLOW_BATCH])
        self.run_id = ids["mlflow"] = run_id
        self._metric = mlflow.entities.Metric

    def log(self, values: dict[str, float], step: int | None) -> None:
        step = step or 0
        now = int(time.time() * 1000)
        metrics = [self._metric(k, v, now, step) for k, v in values.items() if step > self.logged.get(k, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status=self.STATUS.get(status, "FAILED"))


TRACKERS: dict[str, Callable[[RunConfig, Path, int | None, dict[str, str]], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
}


class RunLog(JsonlWriter):
    """metrics.jsonl, with every record also sent to the configured trackers (`logging.trackers`).

    `resumed_at_step`: the checkpoint's step when the run resumes from one (metrics.jsonl already cut back to it),
    None when the run starts. `close(status)` ends the tracker runs with the run's status."""

    def __init__(self, cfg: RunConfig, directory: Path, resumed_at_step: int | None = None) -> None:
        super().__init__(directory / "metrics.jsonl")
        self._directory = directory
        self._trackers: dict[str, Tracker] = {}
        ids = _read_ids(directory) if resumed_at_step is not None else {}
        for name in cfg.logging.trackers:
            try:
                tracker = TRACKERS[name](cfg, directory, resumed_at_step, ids)
            except Exception as e:
                self.close("failed")
                raise ClueAdvError(
                    f"logging.trackers: {name} could not start a run for {directory}: {type(e).__name__}: {e}"
                ) from None
            self._trackers[name] = tracker
            if tracker.new and resumed_at_step is not None:  # what the run logged before, so the curves are whole
                for record in read_jsonl(directory / "metrics.jsonl"):
                    tracker.log(scalars(record), record.get("step"))
        path = directory / IDS_FILE
        if ids:
            atomic_write_json(path, ids)
        elif resumed_at_step is None:
            path.unlink(missing_ok=True)  # an earlier attempt's ids are not this run's

    def write(self, record: dict[str, Any]) -> None:
        super().write(record)
        if not self._trackers:
            return
        values = scalars(record)
        for name, tracker in list(self._trackers.items()):
            try:
                tracker.log(values, record.get("step"))
            except Exception as e:  # a tracker is a mirror: its failure must not end hours of training
                del self._trackers[name]
                _note(f"{self._directory}: {name} stopped logging ({type(e).__name__}: {e}); metrics.jsonl goes on")

    def close(self, status: str = "completed") -> None:
        for name, tracker in self._trackers.items():
            try:
                tracker.close(status)
            except Exception as e:
                _note(f"{self._directory}: {name} did not close cleanly ({type(e).__name__}: {e})")
        self._trackers = {}
        super().close()


def _read_ids(directory: Path) -> dict[str, str]:
    try:
        ids = json.loads((directory / IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in ids.items() if isinstance(v, str)} if isinstance(ids, dict) else {}


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as `a.b.c` -> text, as MLflow params take it."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, str) else json.dumps(value)
    return out


def mlflow_tracking_uri(directory: Path) -> str | None:
    """The tracking URI the MLflow tracker passes for the run in `directory`: None when MLFLOW_TRACKING_URI is set
    (MLflow reads it itself, untouched), else the SQLite store <output_dir>/mlflow.db."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    return "sqlite:///" + (output_root(directory).resolve() / MLFLOW_STORE).as_posix()


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An exclusive flock on `path` for the block, waiting for it (the kernel releases it if the holder dies).
    Unlocked where there is no flock (Windows, a file system without it)."""
    with open(path, "a") as f:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX)
            except OSError:  # ENOLCK and the like: better an unserialised setup than no tracker
                pass
        yield  # closing the file releases the lock


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()  # only an empty directory: never anything MLflow or the user put there
    except OSError:
        pass


def _remove(path: Path) -> None:
    if path.is_symlink():  # planted: removed, never followed
        path.unlink()
    shutil.rmtree(path, ignore_errors=True)


def _note(message: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(message, highlight=False, markup=False, soft_wrap=True)
