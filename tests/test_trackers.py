"""Experiment trackers (`logging.trackers`): TensorBoard for real (its event files read back and compared with
metrics.jsonl, resumed runs included); Weights & Biases and MLflow through stand-in modules (no network), checking
what a run sends them; a missing package is a config error naming the extra."""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import types
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from conftest import smoke_config
from typer.testing import CliRunner

import clue_adv.train as train_module
from clue_adv.cli import app
from clue_adv.config import LoggingConfig
from clue_adv.data import ASSETS
from clue_adv.errors import ClueAdvError, ConfigError
from clue_adv.rundir import read_jsonl
from clue_adv.trackers import TRACKERS, scalars
from clue_adv.train import train


@pytest.fixture
def event_accumulator() -> type:
    """TensorBoard's own reader of event files (the tensorboard package is in the dev extra)."""
    module = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    return module.EventAccumulator


def _config(trackers: list[str], **overrides: Any):
    """3 epochs of 6 steps (96 examples, batch 16), a line every step, a checkpoint at each epoch's end."""
    base = smoke_config()
    fields = {
        "data": {"path": base.data.path, "max_train_samples": 96, "max_eval_samples": 64},
        "batch_size": 16,
        "epochs": 3,
        "log_every_n_steps": 1,
        "checkpoint": {"every_epoch": True},
        "logging": {"trackers": trackers},
    }
    return smoke_config(**(fields | overrides))


def _interrupted(cfg: Any, output_dir: Path, call: int = 8) -> None:
    """Run `cfg` with a Ctrl-C at train_step call `call` (8: in epoch 2, after the checkpoint of step 6)."""
    calls: list[int] = []
    original = train_module.train_step

    def step(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "train_step", step)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, output_dir, show_progress=False)


def _expected(directory: Path) -> dict[str, list[tuple[int, float]]]:
    """What a tracker should hold, read from metrics.jsonl: each numeric field as `<type>/<field>` at its step."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for record in read_jsonl(directory / "metrics.jsonl"):
        for key, value in record.items():
            if key not in ("type", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                out[f"{record['type']}/{key}"].append((record["step"], float(value)))
    return dict(out)


def _tensorboard(reader: type, directory: Path) -> dict[str, list[tuple[int, float]]]:
    events = reader(str(directory / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _assert_same(actual: dict[str, list[tuple[int, float]]], expected: dict[str, list[tuple[int, float]]]) -> None:
    assert sorted(actual) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in actual[tag]] == [s for s, _ in points], tag  # each step once, in order
        # TensorBoard keeps float32
        assert [v for _, v in actual[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag


def test_tensorboard_holds_every_metrics_record_under_its_type(tmp_path, event_accumulator):
    outcome = train(_config(["tensorboard"], epochs=1), tmp_path, show_progress=False)
    expected = _expected(outcome.directory)
    assert {"train/loss", "train/lr", "train/grad_norm", "eval/accuracy", "eval/macro_f1", "eval/loss"} <= set(expected)
    assert len(expected["train/loss"]) == 6 and len(expected["eval/accuracy"]) == 1
    _assert_same(_tensorboard(event_accumulator, outcome.directory), expected)
    events = event_accumulator(str(outcome.directory / "tensorboard"))
    events.Reload()
    assert "config/text_summary" in events.Tags()["tensors"]  # the resolved config, for the TensorBoard text tab


def test_a_resumed_run_has_each_step_once_in_tensorboard(tmp_path, event_accumulator):
    """Interrupted at step 8 of 18 (checkpoint after step 6): steps 7 was logged, then logged again on resume. The
    events after the checkpoint are purged, so TensorBoard ends as metrics.jsonl does, each step once."""
    cfg = _config(["tensorboard"])
    _interrupted(cfg, tmp_path)
    outcome = train(cfg, tmp_path, show_progress=False)
    assert outcome.summary["resumed_after_epochs"] == [1]
    expected = _expected(outcome.directory)
    assert [s for s, _ in expected["train/loss"]] == list(range(1, 19))
    _assert_same(_tensorboard(event_accumulator, outcome.directory), expected)

    # --force starts over: the earlier curves go, the new ones are the run's
    again = train(cfg, tmp_path, force=True, show_progress=False)
    _assert_same(_tensorboard(event_accumulator, again.directory), _expected(again.directory))


def test_tensorboard_turned_on_for_an_interrupted_run_resumes_it_and_gets_the_earlier_records(
    tmp_path, event_accumulator
):
    _interrupted(_config([]), tmp_path)
    outcome = train(_config(["tensorboard"]), tmp_path, show_progress=False)  # trackers are not the run's identity
    assert outcome.summary["resumed_after_epochs"] == [1]
    _assert_same(_tensorboard(event_accumulator, outcome.directory), _expected(outcome.directory))


# --------------------------------------------------------------------------------------------------
# Weights & Biases and MLflow: stand-in modules that record what they receive


class FakeWandbRun:
    def __init__(self, run_id: str, kwargs: dict[str, Any]) -> None:
        self.id, self.kwargs = run_id, kwargs
        self.logged: list[tuple[int, dict[str, float]]] = []
        self.exit_code: int | None = None

    def log(self, values: dict[str, float], step: int) -> None:
        self.logged.append((step, dict(values)))

    def finish(self, exit_code: int = 0) -> None:
        self.exit_code = exit_code


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # others (transformers) ask find_spec about it
    return module


def fake_wandb() -> types.ModuleType:
    wandb = _module("wandb")
    wandb.runs = []

    def init(**kwargs: Any) -> FakeWandbRun:
        run = FakeWandbRun(kwargs.get("id") or f"wb{len(wandb.runs)}", kwargs)
        wandb.runs.append(run)
        return run

    wandb.init = init
    return wandb


class Metric(NamedTuple):
    key: str
    value: float
    timestamp: int
    step: int


class Param(NamedTuple):
    key: str
    value: str


class FakeMlflowClient:
    """MlflowClient's calls the tracker makes, over one in-memory store shared by every client. Like MLflow before
    3.10 opening a SQLite store, it leaves an empty ./mlruns (its default artifact root) in the working directory;
    it records the tracking URI it was given and whether the output directory's setup lock was held then."""

    def __init__(self, store: dict[str, Any], tracking_uri: str | None = None) -> None:
        self.store = store
        store["clients"].append({"tracking_uri": tracking_uri, "setup_locked": _setup_locked(tracking_uri)})
        if tracking_uri is not None and tracking_uri.startswith("sqlite:///"):
            Path("mlruns").mkdir(exist_ok=True)

    def get_experiment_by_name(self, name: str):
        found = self.store["experiments"].get(name)
        return None if found is None else types.SimpleNamespace(experiment_id=found)

    def create_experiment(self, name: str, artifact_location: str | None = None) -> str:
        self.store["experiments"][name] = f"exp{len(self.store['experiments'])}"
        self.store["artifact_locations"][name] = artifact_location
        return self.store["experiments"][name]

    def create_run(self, experiment_id: str, run_name: str, tags: dict[str, str]):
        run_id = f"run{len(self.store['runs'])}"
        self.store["runs"][run_id] = {
            "experiment_id": experiment_id, "name": run_name, "tags": tags, "params": {}, "metrics": [], "status": [],
        }  # fmt: skip
        return types.SimpleNamespace(info=types.SimpleNamespace(run_id=run_id))

    def log_batch(self, run_id: str, metrics=(), params=()) -> None:
        assert len(params) <= 100  # MLflow's limit per call
        run = self.store["runs"][run_id]
        run["metrics"] += list(metrics)
        for p in params:
            assert p.key not in run["params"]  # MLflow refuses to change a param
            run["params"][p.key] = p.value

    def update_run(self, run_id: str, status: str) -> None:
        self.store["runs"][run_id]["status"].append(status)

    def set_terminated(self, run_id: str, status: str) -> None:
        self.store["runs"][run_id]["status"].append(status)

    def get_run(self, run_id: str):
        latest = {m.key: m.value for m in self.store["runs"][run_id]["metrics"]}
        return types.SimpleNamespace(data=types.SimpleNamespace(metrics=latest))

    def get_metric_history(self, run_id: str, key: str) -> list[Metric]:
        return [m for m in self.store["runs"][run_id]["metrics"] if m.key == key]


def fake_mlflow() -> types.ModuleType:
    mlflow = _module("mlflow")
    mlflow.store = {"experiments": {}, "runs": {}, "clients": [], "artifact_locations": {}}
    mlflow.MlflowClient = lambda tracking_uri=None: FakeMlflowClient(mlflow.store, tracking_uri)
    mlflow.entities = types.SimpleNamespace(Metric=Metric, Param=Param)
    mlflow.exceptions = types.SimpleNamespace(MlflowException=type("MlflowException", (Exception,), {}))
    return mlflow


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> tuple[types.ModuleType, types.ModuleType]:
    wandb, mlflow = fake_wandb(), fake_mlflow()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return wandb, mlflow


def _setup_locked(tracking_uri: str | None) -> bool | None:
    """Whether another open file holds the flock on the output directory's .mlflow.lock (None: no such file)."""
    fcntl = pytest.importorskip("fcntl")
    if tracking_uri is None or not tracking_uri.startswith("sqlite:///"):
        return None
    lock = Path(tracking_uri.removeprefix("sqlite:///")).parent / ".mlflow.lock"
    if not lock.exists():
        return None
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        return False


def _by_step(pairs: list[tuple[int, dict[str, float]]]) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for step, values in pairs:
        for key, value in values.items():
            out[key].append((step, value))
    return dict(out)


def test_wandb_and_mlflow_get_one_named_run_per_run_directory_with_every_record(tmp_path, fakes):
    wandb, mlflow = fakes
    cfg = _config(["wandb", "mlflow"], epochs=1, strategy={"name": "fgm"}, experiment="study")
    outcome = train(cfg, tmp_path, show_progress=False)
    directory, expected = outcome.directory, _expected(outcome.directory)
    assert directory == tmp_path / "study" / "tnews" / "fgm" / "seed-1"

    (run,) = wandb.runs
    kwargs = run.kwargs
    assert (kwargs["name"], kwargs["group"], kwargs["project"]) == ("tnews/fgm/seed-1", "study", "clue-adv")
    assert kwargs["dir"] == str(directory) and kwargs["id"] is None
    assert kwargs["config"] == cfg.model_copy(update={"output_dir": str(tmp_path)}).resolved()
    assert _by_step(run.logged) == expected and run.exit_code == 0

    (logged,) = mlflow.store["runs"].values()
    assert mlflow.store["experiments"] == {"study": logged["experiment_id"]}
    assert logged["name"] == "tnews/fgm/seed-1" and logged["tags"]["run_dir"] == str(directory)
    assert logged["params"]["strategy.name"] == "fgm" and logged["params"]["optim.lr"] == "0.001"
    assert _by_step([(m.step, {m.key: m.value}) for m in logged["metrics"]]) == expected
    assert logged["status"] == ["FINISHED"]
    assert json.loads((directory / "trackers.json").read_text()) == {"wandb": run.id, "mlflow": "run0"}


def _mlflow_tracker(output_dir: Path, experiment: str = "study"):
    """The MLflow tracker of a fresh run under `output_dir`, as RunLog starts it (no training)."""
    from clue_adv.rundir import run_dir

    cfg = _config(["mlflow"], experiment=experiment)
    directory = run_dir(cfg, output_dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    return TRACKERS["mlflow"](cfg, directory, None, {})


def test_mlflow_defaults_to_one_sqlite_store_in_the_output_directory(tmp_path, fakes, monkeypatch):
    """Without MLFLOW_TRACKING_URI, the runs of an output directory share <output_dir>/mlflow.db, whatever the
    working directory, and nothing is left in the working directory."""
    _, mlflow = fakes
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    for experiment in ("study", "study", "other"):
        _mlflow_tracker(tmp_path / "out", experiment).close("completed")
    out = (tmp_path / "out").resolve()
    expected = f"sqlite:///{out}/mlflow.db"  # by hand: SQLAlchemy's absolute form, four slashes
    assert expected.startswith("sqlite:////")
    assert mlflow.store["clients"] == [{"tracking_uri": expected, "setup_locked": True}] * 3
    assert mlflow.store["artifact_locations"] == {n: f"file://{out}/mlartifacts" for n in ("study", "other")}
    assert list(cwd.iterdir()) == []  # the empty ./mlruns older MLflow makes is removed

    # ... but a ./mlruns that was there before (the user's own store, or one MLflow made for them) is left alone
    (cwd / "mlruns").mkdir()
    _mlflow_tracker(tmp_path / "out2").close("completed")
    assert (cwd / "mlruns").is_dir()


def test_mlflow_tracking_uri_set_in_the_environment_is_left_to_mlflow(tmp_path, fakes, monkeypatch):
    _, mlflow = fakes
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    monkeypatch.chdir(tmp_path)
    _mlflow_tracker(tmp_path / "out").close("completed")
    # MlflowClient gets no URI, so MLflow reads the variable itself; the experiment keeps the server's artifacts
    assert mlflow.store["clients"] == [{"tracking_uri": None, "setup_locked": None}]
    assert mlflow.store["artifact_locations"] == {"study": None}
    assert not (tmp_path / "out" / "mlflow.db").exists()
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://127.0.0.1:5000"


def test_a_resumed_run_continues_its_wandb_and_mlflow_runs(tmp_path, fakes):
    wandb, mlflow = fakes
    cfg = _config(["wandb", "mlflow"])
    _interrupted(cfg, tmp_path)
    first = wandb.runs[0]
    assert first.exit_code == 1 and mlflow.store["runs"]["run0"]["status"] == ["KILLED"]
    outcome = train(cfg, tmp_path, show_progress=False)
    expected = _expected(outcome.directory)
    del expected["train/step_time_s"]  # a time: step 7's differs between the attempts; the rest is exact

    def sent(points):
        return {k: v for k, v in _by_step(points).items() if k != "train/step_time_s"}

    resumed = wandb.runs[1]
    assert resumed.kwargs["id"] == first.id and resumed.kwargs["resume"] == "allow"
    # wandb drops the steps below its run's current step itself: together the two attempts sent every record
    assert resumed.logged[0][0] == 7  # the checkpoint was after step 6
    assert sent(first.logged + [(s, v) for s, v in resumed.logged if s >= 8]) == expected

    assert list(mlflow.store["runs"]) == ["run0"]  # the same MLflow run, each step in it once
    logged = mlflow.store["runs"]["run0"]
    assert sent([(m.step, {m.key: m.value}) for m in logged["metrics"]]) == expected
    assert logged["status"] == ["KILLED", "RUNNING", "FINISHED"]


def test_a_tracker_that_fails_mid_run_is_dropped_and_the_run_completes(tmp_path, fakes, capfd):
    wandb, _ = fakes
    broken = {"calls": 0}
    init = wandb.init

    def flaky_init(**kwargs):
        run = init(**kwargs)

        def log(values, step):
            broken["calls"] += 1
            if broken["calls"] == 3:
                raise ConnectionError("network is unreachable")

        run.log = log
        return run

    wandb.init = flaky_init
    outcome = train(_config(["wandb"], epochs=1), tmp_path, show_progress=False)
    assert outcome.summary["status"] == "completed"
    assert broken["calls"] == 3  # nothing sent after the failure
    assert len(read_jsonl(outcome.directory / "metrics.jsonl")) == 7  # 6 train lines, 1 evaluation
    assert "wandb stopped logging (ConnectionError: network is unreachable)" in capfd.readouterr().err


def test_a_tracker_that_cannot_start_is_a_named_error_before_training(tmp_path, fakes):
    wandb, _ = fakes

    def no_login(**kwargs):
        raise RuntimeError("api_key not configured (no-tty)")

    wandb.init = no_login
    with pytest.raises(ClueAdvError, match=r"logging.trackers: wandb could not start a run .*api_key not configured"):
        train(_config(["wandb"], epochs=1), tmp_path, show_progress=False)
    directory = tmp_path / "test" / "tnews" / "none" / "seed-1"
    assert not (directory / "summary.json").exists()  # never `running`: the run did not start


# --------------------------------------------------------------------------------------------------
# Config and names


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "mlflow"])
def test_a_tracker_whose_package_is_missing_is_a_config_error_naming_the_extra(tmp_path, monkeypatch, tracker):
    monkeypatch.setitem(sys.modules, tracker, None)  # not importable, as when it is not installed
    message = f"logging.trackers: '{tracker}' needs the {tracker} package, which is not installed: " + (
        f"pip install 'clue-adv[{tracker}]'"
    )
    with pytest.raises(ConfigError) as e:
        train(_config([tracker]), tmp_path, show_progress=False)
    assert e.value.exit_code == 2 and message in e.value.problems
    assert not any(tmp_path.iterdir())  # refused before anything was written

    config = tmp_path / "run.yaml"
    config.write_text(
        f"task: tnews\ndata: {{path: {ASSETS / 'tnews'}}}\nmodel: {{name_or_path: {ASSETS / 'tokenizer'}}}\n"
        f"logging: {{trackers: [{tracker}]}}\n"
    )
    result = CliRunner().invoke(app, ["validate", str(config)])
    assert result.exit_code == 2 and message in result.output
    # the same when the rest of the config fails its schema
    config.write_text(config.read_text() + "epochs: 0\n")
    result = CliRunner().invoke(app, ["validate", str(config)])
    assert result.exit_code == 2 and message in result.output and "epochs" in result.output


def test_tracker_names_are_checked():
    assert LoggingConfig().trackers == []  # none by default
    with pytest.raises(ConfigError, match=r"logging.trackers.0: Input should be 'tensorboard', 'wandb' or 'mlflow'"):
        smoke_config(logging={"trackers": ["tensorbord"]})
    with pytest.raises(ConfigError, match="logging.trackers: listed more than once: wandb"):
        smoke_config(logging={"trackers": ["wandb", "mlflow", "wandb"]})
    assert set(TRACKERS) == set(LoggingConfig.model_fields["trackers"].annotation.__args__[0].__args__)


def test_scalars_are_the_numeric_fields_named_by_record_type():
    record = {
        "type": "diagnostics", "epoch": 2, "step": 40, "input_gradient_norm": 0.5, "attack": {"pgd": 0.25},
        "note": "text", "epsilons": [0.1, 0.2], "converged": True, "missing": None, "diverged": float("nan"),
    }  # fmt: skip
    assert scalars(record) == {
        "diagnostics/epoch": 2.0,
        "diagnostics/input_gradient_norm": 0.5,
        "diagnostics/attack/pgd": 0.25,
    }
