"""Sweeps: grid expansion and naming, validation, resume, parallel workers, the submitit path, the
shipped sweep files, and the smoke sweep end to end on a tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RUN
from rich.console import Console
from typer.testing import CliRunner

from clue_adv.cli import app
from clue_adv.config import parse_config
from clue_adv.data import ASSETS
from clue_adv.errors import ConfigError
from clue_adv.regularizers import registry
from clue_adv.rundir import find_run_dirs, read_summary, start_run
from clue_adv.sweep import core_sets, load_plan, load_sweep, run_sweep, submitit_executor, sweep_status

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
TINY = TINY_RUN


@pytest.fixture(autouse=True)
def _one_thread():
    """On 2 shared cores a second intra-op thread mostly waits for other processes (in-process runs)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_sweep(tmp_path: Path, body: dict, name: str = "sweep.yaml") -> Path:
    """A sweep file next to a tiny base run config (`base` is relative to the sweep file)."""
    base = {
        "experiment": "sw",
        "task": "tnews",
        "data": {"path": str(ASSETS / "tnews")},
        "model": {"name_or_path": str(ASSETS / "tokenizer"), "init": "random"},
        "optim": {"lr": 1e-3},
        "output_dir": str(tmp_path / "out"),
    }
    (tmp_path / "configs").mkdir(exist_ok=True)
    (tmp_path / "configs" / "tiny.yaml").write_text(yaml.safe_dump(base))
    sweep = {"base": "../configs/tiny.yaml", "overrides": dict(TINY), **body}
    path = tmp_path / "sweeps" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def tag_of(block: dict) -> str:
    return parse_config({"task": "tnews", "strategy": block}).strategy.directory_tag()


def quiet() -> Console:
    return Console(stderr=True, force_terminal=False, width=200)


# --------------------------------------------------------------------------------------------------
# Planning


def test_grid_expansion_run_names_and_paired_seeds(tmp_path):
    path = write_sweep(
        tmp_path,
        {
            "tasks": ["tnews", "iflytek"],
            "seeds": 2,
            "strategies": [{"name": "none"}, {"name": "fgm"}, {"name": "gaussian_noise", "sigma": 0.02}],
            "grid": {"fgm.epsilon": [0.1, 0.2], "optim.lr": [0.001, 0.002]},
            "overrides": {**TINY, "data.path": str(ASSETS) + "/{task}"},
        },
    )
    plan = load_plan(path)
    strategy_tags = [
        tag_of({"name": "none"}),
        tag_of({"name": "fgm", "epsilon": 0.1}),
        tag_of({"name": "fgm", "epsilon": 0.2}),
        tag_of({"name": "gaussian_noise", "sigma": 0.02}),
    ]
    expected = {
        (f"sw+optim.lr={lr}", task, tag, seed)
        for lr in ("0.001", "0.002")
        for task in ("tnews", "iflytek")
        for tag in strategy_tags
        for seed in (1, 2)
    }
    got = [(c.config.experiment, c.config.task, c.directory.parent.name, c.config.seed) for c in plan.cells]
    assert len(got) == len(expected) == 32 and set(got) == expected
    assert all(c.state == "absent" for c in plan.cells)
    cell = next(c for c in plan.cells if c.config.task == "iflytek" and c.config.strategy.name == "fgm")
    assert cell.config.data.path == str(ASSETS / "iflytek")  # `{task}` substituted
    assert cell.directory == (tmp_path / "out" / cell.config.experiment / "iflytek" / cell.directory.parent.name /
                              f"seed-{cell.config.seed}").resolve()  # fmt: skip
    assert {c.config.optim.lr for c in plan.cells if c.config.experiment.endswith("0.002")} == {0.002}
    assert plan.cells[0].config.seed == 1 and plan.cells[-1].config.seed == 2  # seed-major: pairs finish early

    # Paired seeds: within a task, lr and seed, the cells differ in the strategy block alone.
    groups: dict[tuple, list[dict]] = {}
    for c in plan.cells:
        resolved = c.config.resolved()
        resolved.pop("strategy")
        groups.setdefault((c.config.experiment, c.config.task, c.config.seed), []).append(resolved)
    assert len(groups) == 8 and all(len(v) == 4 and all(x == v[0] for x in v) for v in groups.values())


def test_strategy_grid_keys_apply_only_where_the_parameter_exists(tmp_path):
    path = write_sweep(
        tmp_path,
        {"seeds": [3], "strategies": [{"name": "none"}, {"name": "fgm"}], "grid": {"strategy.epsilon": [0.1, 0.3]}},
    )
    plan = load_plan(path)
    assert [c.directory.parent.name for c in plan.cells] == [
        "none",
        tag_of({"name": "fgm", "epsilon": 0.1}),
        tag_of({"name": "fgm", "epsilon": 0.3}),
    ]
    assert {c.config.experiment for c in plan.cells} == {"sw"} and {c.config.seed for c in plan.cells} == {3}
    assert load_sweep(path).seed_list() == [3]
    default = write_sweep(tmp_path, {"strategies": [{"name": "none"}]}, "default.yaml")
    assert [c.config.seed for c in load_plan(default).cells] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize(
    "body,needles",
    [
        ({"grid": {"optim.lrr": [1, 2]}}, ["grid.optim.lrr: unknown field 'lrr' in 'optim' (did you mean 'lr'?)"]),
        ({"grid": {"fgm.eps": [0.1]}, "strategies": [{"name": "fgm"}]}, ["grid.fgm.eps:", "did you mean 'epsilon'"]),
        ({"grid": {"fgm.epsilon": [0.1]}}, ["grid.fgm.epsilon: no `fgm` block in strategies"]),
        ({"grid": {"seed": [1, 2]}}, ["grid.seed: set it with the sweep's `seeds` field"]),
        ({"strategies": [{"name": "nope"}]}, ["strategies.0.name: unknown strategy 'nope'"]),
        ({"strategies": [{"name": "fgm", "epsilon": -1}]}, ["strategies.0.epsilon: Input should be greater"]),
        ({"strategies": [{"name": "fgm", "epsilonn": 1}]}, ["strategies.0.epsilonn: unknown field (did you mean"]),
        ({"overrides": {"epochs": 0}}, ["sw/tnews/none: epochs: Input should be greater than 0"]),
        ({"overrides": {"strategy.epsilon": 1}}, ["overrides.strategy.epsilon: strategy fields belong in"]),
        ({"overrides": {"data.path": "/no/such/dir"}}, ["sw/tnews: data.path: directory not found: /no/such/dir"]),
        ({"seeds": [1, 1]}, ["seeds: seeds repeat"]),
        ({"strategies": [{"name": ["fgm"]}]}, ["strategies.0.name: unknown strategy \"['fgm']\"", "valid: none, "]),
        ({"strategies": ["fgm"]}, ["strategies.0: Input should be a valid dictionary"]),
        ({"per_task": {"tnews": {"optim.lrr": 1}}}, ["per_task.tnews.optim.lrr: unknown field 'lrr' in 'optim'"]),
        # Bounded so that a typo fails at once: these used to hang `--dry-run` or raise MemoryError.
        ({"seeds": 200000}, ["seeds", "less than or equal to 1000"]),
        ({"seeds": 1.3e16}, ["seeds", "less than or equal to 1000"]),
        (
            {"seeds": 1000, "tasks": ["tnews", "iflytek"], "grid": {"optim.lr": [i / 1e4 for i in range(1, 52)]}},
            ["the sweep plans 102000 runs", "at most 100000"],
        ),
        ({"grids": {}}, ["grids: unknown field (did you mean 'grid'?)"]),
        ({"base": "../configs/missing.yaml"}, ["base: run config not found", "relative to the sweep file's directory"]),
    ],
)
def test_bad_sweeps_exit_2_naming_the_field(tmp_path, body, needles):
    path = write_sweep(tmp_path, body)
    result = runner.invoke(app, ["sweep", "-c", str(path), "--dry-run"])
    assert result.exit_code == 2, result.output
    for needle in needles:
        assert needle in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_strategy_blocks_are_typed_by_the_run_configs_strategy_union(tmp_path):
    path = write_sweep(tmp_path, {"seeds": 1, "strategies": [{"name": "fgm", "epsilon": 0.25}, {"name": "none"}]})
    assert [type(b).__name__ for b in load_sweep(path).strategies] == ["FGMConfig", "NoneConfig"]
    # Without `strategies`, the base's strategy is the one block, checked as the base file's field.
    path = write_sweep(tmp_path, {"seeds": 1}, "from-base.yaml")
    base_file = tmp_path / "configs" / "tiny.yaml"  # written by write_sweep
    base = yaml.safe_load(base_file.read_text())
    base_file.write_text(yaml.safe_dump({**base, "strategy": {"name": "fgm", "epsilon": -1}}))
    with pytest.raises(ConfigError) as e:
        load_plan(path)
    assert e.value.problems == ["base: strategy.epsilon: Input should be greater than or equal to 0 (got -1)"]


def test_set_keys_are_checked_like_the_sweeps_own_keys(tmp_path):
    path = write_sweep(tmp_path, {"seeds": 1})
    with pytest.raises(ConfigError) as e:
        load_plan(path, overrides=["task=iflytek", "optim.lrr=1"])
    assert e.value.problems == [
        "--set task: set it with the sweep's `tasks` field",  # was `--set.task`, unlike the line below
        "--set optim.lrr: unknown field 'lrr' in 'optim' (did you mean 'lr'?)",
    ]


def test_a_tagged_block_under_a_strategy_grid_gets_one_directory_per_value(tmp_path):
    path = write_sweep(
        tmp_path,
        {
            "seeds": 1,
            "strategies": [{"name": "fgm", "tag": "fgm-study"}, {"name": "fgm"}],
            "grid": {"fgm.epsilon": [0.1, 0.5]},
        },
    )
    plan = load_plan(path)
    assert [(c.directory.parent.name, c.config.strategy.epsilon) for c in plan.cells] == [
        ("fgm-study-epsilon=0.1", 0.1),
        ("fgm-study-epsilon=0.5", 0.5),
        (tag_of({"name": "fgm", "epsilon": 0.1}), 0.1),  # untagged blocks keep their naming
        (tag_of({"name": "fgm", "epsilon": 0.5}), 0.5),
    ]
    result = runner.invoke(app, ["sweep", "-c", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "fgm-study-epsilon=0.5" in result.output


def test_a_changed_config_under_an_existing_run_is_refused(tmp_path):
    path = write_sweep(tmp_path, {"seeds": 1, "strategies": [{"name": "none"}, {"name": "gaussian_noise"}]})
    cell = load_plan(path).cells[1]
    start_run(cell.config.model_copy(update={"epochs": 2}), cell.directory)  # someone else's run, another config
    with pytest.raises(ConfigError) as e:
        load_plan(path)
    assert str(cell.directory) in str(e.value) and "differs in: epochs" in str(e.value)
    result = runner.invoke(app, ["sweep", "-c", str(path)])
    assert result.exit_code == 2 and "holds a run with a different config" in result.output
    assert not (cell.directory.parent.parent / "none").exists()  # nothing ran
    assert yaml.safe_load((cell.directory / "config.yaml").read_text())["epochs"] == 2  # nothing overwritten


def test_core_sets_split_cores_between_workers():
    assert core_sets([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert core_sets([0, 1], 2) == [[0], [1]]
    assert core_sets([0, 1], 3) == [[0], [1], [0]]
    assert core_sets([4, 5, 6, 7], 1) == [[4, 5, 6, 7]]


def test_slurm_block_reaches_the_submitit_executor(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    # submitit's SlurmExecutor refuses to exist without `srun` on PATH; building the sbatch script needs no
    # cluster, so a stand-in that fails if ever run lets this test check the parameters on any machine.
    stand_in = tmp_path / "bin" / "srun"
    stand_in.parent.mkdir()
    stand_in.write_text("#!/bin/sh\necho 'srun stand-in: not a cluster' >&2\nexit 99\n")
    stand_in.chmod(0o755)
    monkeypatch.setenv("PATH", f"{stand_in.parent}{os.pathsep}{os.environ.get('PATH', '')}")
    slurm = {"partition": "gpu", "time_min": 90, "cpus_per_task": 6, "gpus_per_node": 1, "mem_gb": 40}
    slurm |= {"array_parallelism": 4, "account": "lab", "setup": ["module load cuda"], "additional": {"exclude": "n1"}}
    path = write_sweep(tmp_path, {"seeds": 1, "slurm": slurm})
    executor = submitit_executor(load_plan(path), "slurm")
    script = executor._executor._make_submission_file_text("python -m x", "uid")
    for line in ("--partition=gpu", "--time=90", "--cpus-per-task=6", "--gpus-per-node=1", "--mem=40GB"):
        assert f"#SBATCH {line}" in script
    assert "#SBATCH --account=lab" in script and "#SBATCH --exclude=n1" in script and "module load cuda" in script
    assert executor._executor.parameters["array_parallelism"] == 4


# --------------------------------------------------------------------------------------------------
# Running (real training on the tiny model)


def test_resume_after_interruption_reruns_exactly_the_unfinished_runs(tmp_path, monkeypatch):
    import clue_adv.sweep.outcome
    from clue_adv.regularizers.gaussian_noise import GaussianNoise

    path = write_sweep(tmp_path, {"seeds": 2, "strategies": [{"name": "none"}, {"name": "gaussian_noise"}]})
    # The first gaussian_noise run diverges (non-finite loss), the second is hit by Ctrl-C.
    started = []
    original_step = GaussianNoise.training_step

    def setup(self, model):
        started.append(1)

    def step(self, ctx):
        if len(started) == 1:
            result = original_step(self, ctx)
            result.loss = result.loss * float("nan")
            return result
        raise KeyboardInterrupt

    monkeypatch.setattr(GaussianNoise, "setup", setup)
    monkeypatch.setattr(GaussianNoise, "training_step", step)
    plan = load_plan(path)
    first = run_sweep(plan, console=quiet())
    assert first.interrupted and first.exit_code == 130
    assert [(r.cell.config.strategy.name, r.cell.config.seed, r.status) for r in first.results] == [
        ("none", 1, "completed"),
        ("gaussian_noise", 1, "failed"),
        ("none", 2, "completed"),
        ("gaussian_noise", 2, "interrupted"),
    ]
    assert "non-finite loss" in first.results[1].error
    monkeypatch.undo()

    plan = load_plan(path)
    assert [c.state for c in plan.cells] == ["completed", "failed", "completed", "interrupted"]
    done = {c.directory: (c.directory / "summary.json").read_bytes() for c in plan.cells if c.done}
    ran = []
    real_train = clue_adv.sweep.outcome.train

    def recording_train(cfg, *args, **kwargs):
        ran.append((cfg.strategy.name, cfg.seed))
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(clue_adv.sweep.outcome, "train", recording_train)
    second = run_sweep(plan, console=quiet())
    assert ran == [("gaussian_noise", 1), ("gaussian_noise", 2)]
    assert second.exit_code == 0 and len(second.by_status("skipped")) == 2 and len(second.by_status("completed")) == 2
    assert all(d.joinpath("summary.json").read_bytes() == before for d, before in done.items())
    assert all(c.state == "completed" for c in load_plan(path).cells)


def test_parallel_workers_and_a_failed_run_does_not_stop_the_sweep(tmp_path):
    bad = tmp_path / "bad-iflytek"
    bad.mkdir()
    for name in ("labels.json", "dev.json"):
        (bad / name).write_bytes((ASSETS / "iflytek" / name).read_bytes())
    (bad / "train.json").write_text(json.dumps({"label": "999", "sentence": "x"}) + "\n", encoding="utf-8")
    path = write_sweep(
        tmp_path,
        {"tasks": ["tnews", "iflytek"], "seeds": [1], "per_task": {"iflytek": {"data.path": str(bad)}}},
    )
    result = run_sweep(load_plan(path), jobs=2, console=quiet())
    assert result.exit_code == 1
    by_task = {r.cell.config.task: r for r in result.results}
    assert by_task["tnews"].status == "completed" and read_summary(by_task["tnews"].cell.directory)["status"] == (
        "completed"
    )
    failed = by_task["iflytek"]
    assert failed.status == "failed" and "'999' is not in labels.json" in failed.error
    assert "'999' is not in labels.json" in (failed.cell.directory / "train.log").read_text()
    # It failed in setup, before train wrote anything: the sweep still leaves a run directory that says so.
    summary = read_summary(failed.cell.directory)
    assert summary["status"] == "failed" and "'999' is not in labels.json" in summary["error"]
    assert (failed.cell.directory / "config.yaml").is_file()
    # Each worker was pinned to its share of the cores and told so.
    assert "done:" in (by_task["tnews"].cell.directory / "train.log").read_text()


def test_a_cell_that_fails_in_setup_leaves_a_failed_run_directory(tmp_path):
    data = tmp_path / "iflytek-data"
    data.mkdir()
    for name in ("labels.json", "dev.json", "train.json"):
        (data / name).write_bytes((ASSETS / "iflytek" / name).read_bytes())
    path = write_sweep(
        tmp_path,
        {"tasks": ["tnews", "iflytek"], "seeds": [1], "per_task": {"iflytek": {"data.path": str(data)}}},
    )
    plan = load_plan(path)
    (data / "train.json").unlink()  # gone after planning checked it: the run fails while loading data
    result = run_sweep(plan, console=quiet())
    assert result.exit_code == 1
    by_task = {r.cell.config.task: r for r in result.results}
    assert by_task["tnews"].status == "completed"
    failed = by_task["iflytek"]
    assert failed.status == "failed" and "train.json" in failed.error
    summary = read_summary(failed.cell.directory)
    assert summary["status"] == "failed" and summary["error"] == failed.error
    assert summary["failed_stage"] == "setup" and summary["task"] == "iflytek"
    assert find_run_dirs(tmp_path / "out") == sorted(r.cell.directory for r in result.results)
    # Once the file is back, the next plan and `sweep --status` see the failed run, and the sweep reruns it.
    (data / "train.json").write_bytes((ASSETS / "iflytek" / "train.json").read_bytes())
    again = load_plan(path)
    assert [c.state for c in again.cells] == ["completed", "failed"]
    assert {s.cell.config.task: s.status for s in sweep_status(again)} == {"tnews": "completed", "iflytek": "failed"}


def test_an_interrupted_sweep_leaves_a_manifest_and_the_report_shows_unstarted_cells(tmp_path, monkeypatch):
    import clue_adv.sweep.outcome
    from clue_adv.report import build_report

    path = write_sweep(tmp_path, {"seeds": 3, "strategies": [{"name": "none"}]})
    plan = load_plan(path)
    real_train = clue_adv.sweep.outcome.train

    def train_then_ctrl_c(cfg, *args, **kwargs):
        if cfg.seed == 2:
            raise KeyboardInterrupt
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(clue_adv.sweep.outcome, "train", train_then_ctrl_c)
    assert run_sweep(plan, console=quiet()).interrupted
    manifest = json.loads((tmp_path / "out" / "sw" / "sweep.json").read_text(encoding="utf-8"))
    assert manifest["experiment"] == "sw" and manifest["sweep"] == str(path)
    assert [c["run_dir"] for c in manifest["cells"]] == [f"tnews/none/seed-{k}" for k in (1, 2, 3)]
    assert manifest["cells"][0]["identity"]["seed"] == 1 and "output_dir" not in manifest["cells"][0]["identity"]
    report = build_report(tmp_path / "out", plots=False)
    assert {(r.seed, r.status) for r in report.runs} == {(1, "completed"), (2, "not started"), (3, "not started")}
    assert report.tables[0].cell("tnews", "none").not_started == [2, 3]


def test_cpu_peak_memory_is_null_for_runs_that_share_the_sweeps_process(tmp_path, monkeypatch):
    import clue_adv.memory
    import clue_adv.sweep.local
    from clue_adv.report import build_report, cost_rows

    monkeypatch.setattr(clue_adv.sweep.local, "_trained_in_this_process", False)  # as in a fresh `clue-adv sweep`
    # A system that cannot reset the process's peak resident memory (not Linux, or a refusing kernel).
    monkeypatch.setattr(clue_adv.memory, "PROC_CLEAR_REFS", tmp_path / "missing" / "clear_refs")
    path = write_sweep(tmp_path, {"seeds": [1], "strategies": [{"name": "none"}, {"name": "gaussian_noise"}]})
    result = run_sweep(load_plan(path), console=quiet())
    first, second = (read_summary(r.cell.directory) for r in result.results)
    assert first["peak_memory_mb"] > 0 and "peak_memory_note" not in first
    # ru_maxrss never goes down: the second run's figure would be the first run's peak, so none is recorded.
    assert second["status"] == "completed" and second["peak_memory_mb"] is None
    assert "shared its process" in second["peak_memory_note"]
    assert result.results[1].summary["peak_memory_mb"] is None
    report = build_report(tmp_path / "out", plots=False)
    cost = {r[1]: r[-1] for r in cost_rows(report.tables[0])[1]}
    assert cost["none"] != "–" and cost["gaussian_noise"] == "–"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc/self/clear_refs")
def test_cpu_peak_memory_is_reset_between_runs_that_share_the_sweeps_process(tmp_path, monkeypatch):
    import clue_adv.memory
    import clue_adv.sweep.local
    import clue_adv.sweep.outcome

    if not clue_adv.memory.reset_peak_rss():
        pytest.skip("this kernel refuses to reset the peak resident memory")
    monkeypatch.setattr(clue_adv.sweep.local, "_trained_in_this_process", False)
    real_train, calls = clue_adv.sweep.outcome.train, []

    def train_after_a_big_peak(cfg, *args, **kwargs):
        calls.append(cfg.strategy.name)
        if len(calls) == 1:  # the first run's peak is 400 MiB above anything the second run needs
            block = bytearray(400 * 2**20)
            block[::4096] = b"x" * len(block[::4096])  # touch every page, so it is resident
            del block
        return real_train(cfg, *args, **kwargs)

    monkeypatch.setattr(clue_adv.sweep.outcome, "train", train_after_a_big_peak)
    path = write_sweep(tmp_path, {"seeds": [1], "strategies": [{"name": "none"}, {"name": "gaussian_noise"}]})
    result = run_sweep(load_plan(path), console=quiet())
    first, second = (read_summary(r.cell.directory) for r in result.results)
    assert second["status"] == "completed" and "peak_memory_note" not in second
    # Measured, and the second run's own: not the first run's peak, which stays in ru_maxrss.
    assert second["peak_memory_mb"] is not None and second["peak_memory_mb"] < first["peak_memory_mb"] - 200
    assert result.results[1].summary["peak_memory_mb"] == second["peak_memory_mb"]


def test_submitit_local_executor_runs_the_grid(tmp_path):
    pytest.importorskip("submitit")
    path = write_sweep(tmp_path, {"seeds": [1], "slurm": {"gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 2}})
    plan = load_plan(path)
    result = run_sweep(plan, executor="submitit-local", console=quiet())
    assert result.exit_code == 0 and [r.status for r in result.results] == ["completed"]
    assert all(read_summary(c.directory)["status"] == "completed" for c in plan.cells)
    assert list((tmp_path / "out" / "sw" / "slurm").glob("*/*_result.pkl"))  # went through submitit's files
    again = run_sweep(load_plan(path), executor="submitit-local", console=quiet())
    assert [r.status for r in again.results] == ["skipped"]  # nothing submitted the second time


def test_smoke_sweep_end_to_end_prints_a_row_per_strategy(tmp_path):
    sweep = load_sweep(REPO / "sweeps" / "smoke.yaml")
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    command = ["sweep", "-c", str(REPO / "sweeps" / "smoke.yaml"), "-o", str(tmp_path), *sets]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    n = len(sweep.strategies) * len(sweep.seed_list())
    assert f"{n} completed, 0 skipped, 0 failed" in result.output
    assert f"[{n}/{n}] completed" in result.output  # plain progress lines when not a terminal
    # the --set fields name a variant of the experiment (smoke+...; hashed when long): its own folder
    (experiment,) = [p for p in tmp_path.iterdir() if p.name.startswith("smoke+")]
    report = (experiment / "report.md").read_text()
    table = report.split("### Dev accuracy at the best epoch (%)")[1].split("###")[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| strategy")]
    assert len(rows) == len(sweep.strategies)
    assert {row.split(" | ")[0][2:] for row in rows} == {block.directory_tag() for block in sweep.strategies}
    assert all("(n=2)" in row for row in rows)
    for block in sweep.strategies:
        assert block.directory_tag()[:10] in result.output  # the terminal table
    # accuracy per seed, curves, gain vs cost; the smoke runs record diagnostics: robustness, gain vs mechanism
    plots = sorted(p.name for p in (experiment / "plots").glob("*.png"))
    kinds = ["accuracy", "curves", "gain-cost", "gain-mechanism", "robustness"]
    assert len(plots) == len(kinds) and all(any(p.endswith(f"-{kind}.png") for p in plots) for kind in kinds)
    dry = runner.invoke(
        app, ["sweep", "-c", str(REPO / "sweeps" / "smoke.yaml"), "-o", str(tmp_path), *sets, "--dry-run"]
    )
    assert dry.exit_code == 0 and f"{n} planned, {n} completed, 0 to run" in dry.output


# --------------------------------------------------------------------------------------------------
# Shipped sweeps


@pytest.mark.parametrize("path", sorted((REPO / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_is_valid(path, tmp_path):
    wanted = {b["name"] for b in yaml.safe_load(path.read_text(encoding="utf-8")).get("strategies") or []}
    missing = wanted - set(registry())
    if missing:
        pytest.skip(f"strategies not registered in this checkout: {', '.join(sorted(missing))}")
    plan = load_plan(path, output_dir=tmp_path)
    assert plan.cells and all(c.state == "absent" for c in plan.cells)
    if path.name == "all-strategies.yaml":
        assert {c.config.strategy.name for c in plan.cells} == set(registry())
    if path.name == "reproduce.yaml":
        assert {c.config.task for c in plan.cells} == {"tnews", "iflytek"}
        assert {c.config.strategy.name for c in plan.cells} == {"none", "fgm", "gradient_penalty"}
        assert {c.config.seed for c in plan.cells} == {1, 2, 3, 4, 5}
        assert {c.config.model.name_or_path for c in plan.cells} == {"bert-base-chinese"}


def test_the_early_stopping_reproduction_is_the_reproduction_with_early_stopping_only(tmp_path):
    """sweeps/reproduce-early-stopping.yaml must stay sweeps/reproduce.yaml's grid: the same cells with the same
    configs but for eval.early_stopping (on) and the experiment folder (its own, so the two never mix)."""
    full = load_plan(REPO / "sweeps" / "reproduce.yaml", output_dir=tmp_path).cells
    stopped = load_plan(REPO / "sweeps" / "reproduce-early-stopping.yaml", output_dir=tmp_path).cells
    assert len(stopped) == len(full) == 30
    assert {c.directory.parents[2] for c in stopped}.isdisjoint({c.directory.parents[2] for c in full})
    for f, s in zip(full, stopped, strict=True):
        assert s.config.eval.early_stopping is not None and f.config.eval.early_stopping is None
        assert s.config.epochs == f.config.epochs == 50  # early stopping shortens runs, not the epoch budget
        dumped = s.config.model_dump()
        dumped["experiment"], dumped["eval"]["early_stopping"] = f.config.experiment, None
        assert dumped == f.config.model_dump()


def test_the_proxy_study_tier_2_runs_tier_1s_protocol(tmp_path):
    """Tier 2 shares tier 1's experiment folder and baseline, so every tier-2 run must be tier 1's run of the same
    seed with only the strategy changed: the same data carve, epochs, early stopping (none), diagnostics."""
    tier1 = {
        c.config.seed: c.config for c in load_plan(REPO / "sweeps" / "proxy-tnews.yaml", output_dir=tmp_path).cells
    }
    tier2 = load_plan(REPO / "sweeps" / "proxy-tnews-tier2.yaml", output_dir=tmp_path).cells
    assert len(tier2) == 30
    for cell in tier2:
        dumped, expected = cell.config.model_dump(), tier1[cell.config.seed].model_dump()
        dumped["strategy"] = expected["strategy"]
        assert dumped == expected, cell.directory


@pytest.mark.parametrize("sweep", ["proxy-tnews.yaml", "proxy-tnews-tier2.yaml"])
def test_the_clue_protocol_override_changes_the_schedule_and_nothing_else(sweep, tmp_path):
    """`-c overrides/clue-protocol.yaml`: every run is the proxy run with CLUE's schedule (3 epochs, AdamW weight
    decay 0.01, 10% linear warmup then decay, clipping 1.0) and the same lr, in a folder of its own."""
    proxy = load_plan(REPO / "sweeps" / sweep, output_dir=tmp_path).cells
    clue = load_plan(REPO / "sweeps" / sweep, output_dir=tmp_path, configs=[REPO / "overrides" / "clue-protocol.yaml"])
    assert len(clue.cells) == len(proxy) == 30
    for p, c in zip(proxy, clue.cells, strict=True):
        assert c.config.experiment == "proxy-tnews+clue-protocol" and c.directory != p.directory
        o = c.config.optim
        assert (c.config.epochs, o.weight_decay, o.schedule, o.warmup_ratio, o.max_grad_norm) == (
            3,
            0.01,
            "linear",
            0.1,
            1.0,
        )
        assert o.lr == p.config.optim.lr
        dumped, expected = c.config.model_dump(), p.config.model_dump()
        dumped["experiment"], dumped["epochs"], dumped["optim"] = (
            expected["experiment"],
            expected["epochs"],
            expected["optim"],
        )
        assert dumped == expected


@pytest.mark.parametrize("sweep", ["proxy-tnews-select.yaml", "proxy-tnews.yaml", "proxy-tnews-tier2.yaml"])
def test_the_proxy_protocol_for_bert_base_changes_the_model_and_nothing_else(sweep, tmp_path):
    """README: `-c overrides/proxy-bert-base.yaml` runs the proxy study's protocol with BERT-base. Every cell must be
    the proxy cell with bert-base-chinese's settings swapped in (model, 128 tokens, lr 2e-5) and nothing else, in a
    folder of its own; the strategies keep their relative strengths."""
    proxy = load_plan(REPO / "sweeps" / sweep, output_dir=tmp_path).cells
    override = REPO / "overrides" / "proxy-bert-base.yaml"
    base = load_plan(REPO / "sweeps" / sweep, output_dir=tmp_path, configs=[override])
    assert len(base.cells) == len(proxy) > 0
    for p, b in zip(proxy, base.cells, strict=True):
        assert b.config.experiment == p.config.experiment + "+proxy-bert-base"
        assert (b.config.model.name_or_path, b.config.model.init, b.config.model.head) == (
            "bert-base-chinese",
            "pretrained",
            "cls",
        )
        assert (b.config.max_length, b.config.optim.lr) == (128, 2e-5)
        dumped, expected = b.config.model_dump(), p.config.model_dump()
        for key in ("experiment", "max_length"):
            dumped[key] = expected[key]
        dumped["model"], dumped["optim"]["lr"] = expected["model"], expected["optim"]["lr"]
        assert dumped == expected


# --------------------------------------------------------------------------------------------------
# Slurm bookkeeping without a cluster (tests/test_slurm.py runs the real thing): dry run, status, the queue


def _fake_run(cell, status: str | None = None, job: str | None = None, **summary) -> None:
    """What a run (and a submission) leaves in a directory, without training."""
    from clue_adv.rundir import atomic_write_json
    from clue_adv.sweep import SLURM_RECORD

    if status is not None:
        start_run(cell.config, cell.directory)
        atomic_write_json(cell.directory / "summary.json", {"status": status, **summary})
    if job is not None:
        cell.directory.mkdir(parents=True, exist_ok=True)
        record = {"executor": "slurm", "job_id": job, "folder": str(cell.directory.parent / "%j")}
        (cell.directory / SLURM_RECORD).write_text(json.dumps(record))


def test_dry_run_with_slurm_shows_the_sbatch_script_and_which_task_holds_which_run(tmp_path):
    pytest.importorskip("submitit")
    from clue_adv.sweep import submission

    slurm = {"partition": "gpu", "time_min": 90, "cpus_per_task": 6, "gpus_per_node": 1, "mem_gb": 40}
    slurm |= {"array_parallelism": 2, "setup": ["module load cuda"], "additional": {"exclude": "n1"}}
    path = write_sweep(tmp_path, {"seeds": 2, "strategies": [{"name": "none"}, {"name": "fgm"}], "slurm": slurm})
    cells = load_plan(path).cells
    _fake_run(cells[1], "completed", best_dev_accuracy=0.5)
    plan = load_plan(path)
    todo, queued = submission(plan)
    assert [c.directory for c in todo] == [cells[i].directory for i in (0, 2, 3)] and not queued

    result = runner.invoke(app, ["sweep", "-c", str(path), "--executor", "slurm", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "4 planned, 1 completed, 3 to run" in result.output and "array task" in result.output
    script = result.output.split("sbatch script")[1]
    for line in ("--array=0-2%2", "--partition=gpu", "--time=90", "--cpus-per-task=6", "--gpus-per-node=1"):
        assert f"#SBATCH {line}\n" in script
    assert "#SBATCH --mem=40GB\n" in script and "#SBATCH --exclude=n1\n" in script
    assert "\nmodule load cuda\n" in script and "-m submitit.core._submit" in script
    # Logs go to <output_dir>/<experiment>/slurm/<array>_<task>/ (linked from each run directory at submission).
    assert f"--output={(tmp_path / 'out' / 'sw' / 'slurm').absolute()}/%A_%a/%A_%a_0_log.out" in script
    assert not (tmp_path / "out" / "sw" / "slurm").exists()  # a dry run writes nothing

    local = runner.invoke(app, ["sweep", "-c", str(path), "--dry-run"])
    assert local.exit_code == 0 and "#SBATCH" not in local.output and "array task" not in local.output


def test_slurm_queue_reads_squeue_and_says_none_when_it_cannot(monkeypatch):
    import subprocess

    import clue_adv.sweep.slurm as sweep_module

    listing = "12_[2-4,7%2] PENDING\n12_0 RUNNING\n13 PENDING\n"
    monkeypatch.setattr(sweep_module.shutil, "which", lambda name: "/usr/bin/squeue")
    monkeypatch.setattr(
        sweep_module.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a[0], 0, listing, "")
    )
    assert sweep_module.slurm_queue() == {
        "12_2": "PENDING",
        "12_3": "PENDING",
        "12_4": "PENDING",
        "12_7": "PENDING",
        "12_0": "RUNNING",
        "13": "PENDING",
    }

    def refuse(*args, **kwargs):
        raise subprocess.CalledProcessError(1, args[0], "", "slurm_load_jobs error: Unable to contact controller")

    monkeypatch.setattr(sweep_module.subprocess, "run", refuse)
    assert sweep_module.slurm_queue() is None
    monkeypatch.setattr(sweep_module.shutil, "which", lambda name: None)
    assert sweep_module.slurm_queue() is None


def test_status_from_run_directories_and_the_queue(tmp_path, monkeypatch):
    import clue_adv.sweep.status as sweep_module

    path = write_sweep(tmp_path, {"seeds": [1, 2, 3, 4], "strategies": [{"name": "none"}, {"name": "fgm"}]})
    cells = load_plan(path).cells
    _fake_run(cells[0], "completed", best_dev_accuracy=0.4321)
    _fake_run(cells[1], "failed", error="non-finite loss at step 3")
    _fake_run(cells[2], "running")  # a local run in progress (no job): its last write is shown
    _fake_run(cells[3], "running", job="7_3")  # killed: says running, but its job left the queue
    _fake_run(cells[4], job="7_4")  # queued, not started
    _fake_run(cells[5], "failed", job="7_5", error="old")  # resubmitted and starting: the old summary is stale
    _fake_run(cells[6], "interrupted")
    monkeypatch.setattr(sweep_module, "slurm_queue", lambda: {"7_4": "PENDING", "7_5": "RUNNING"})
    statuses = sweep_module.sweep_status(load_plan(path))
    assert [(s.status, s.job_id) for s in statuses] == [
        ("completed", None),
        ("failed", None),
        ("running", None),
        ("failed", "7_3"),
        ("pending", "7_4"),
        ("running", "7_5"),
        ("interrupted", None),
        ("not started", None),
    ]
    details = [s.detail for s in statuses]
    assert details[0] == "best dev 43.21" and details[1] == "non-finite loss at step 3"
    assert details[2].startswith("last update ") and "left the queue without finishing" in details[3]
    assert details[4] == "job 7_4 waiting in the queue" and details[5] == "job 7_5 running, starting"

    result = runner.invoke(app, ["sweep", "-c", str(path), "--status"])
    assert result.exit_code == 0, result.output
    assert "1 completed, 2 running, 1 pending, 2 failed, 1 interrupted, 1 not started" in result.output

    # Once the queue is empty the queued run has not started and the resubmitted one shows its old result.
    monkeypatch.setattr(sweep_module, "slurm_queue", lambda: {})
    statuses = sweep_module.sweep_status(load_plan(path))
    assert [s.status for s in statuses[4:6]] == ["not started", "failed"]
    assert "left the queue before starting" in statuses[4].detail


def _age_run(directory: Path, seconds: float) -> None:
    import os
    import time

    for name in ("metrics.jsonl", "summary.json"):
        if (directory / name).is_file():
            os.utime(directory / name, (time.time() - seconds, time.time() - seconds))


def test_a_running_run_whose_process_died_shows_as_interrupted(tmp_path):
    from clue_adv.report import build_report
    from clue_adv.rundir import LOCK_NAME, release_run_lock

    path = write_sweep(tmp_path, {"seeds": [1, 2, 3, 4], "strategies": [{"name": "none"}]})
    cells = load_plan(path).cells
    for cell in cells:
        _fake_run(cell, "running")
    _age_run(cells[0].directory, 3600)  # its process is alive (holds the lock), only quiet: still running
    for cell in cells[1:]:
        release_run_lock(cell.directory)  # as when its process dies: the kernel drops the lock
    _age_run(cells[1].directory, 3600)  # died an hour ago: interrupted
    # cells[2]: lock free but written just now (maybe a run on another node whose lock this one cannot see)
    _age_run(cells[3].directory, 3600)
    (cells[3].directory / LOCK_NAME).unlink()  # started by a version without locks: nothing to tell by
    statuses = sweep_status(load_plan(path))
    assert [s.status for s in statuses] == ["running", "interrupted", "running", "running"]
    assert "lock is free" in statuses[1].detail and "ago; rerun the sweep" in statuses[1].detail
    result = runner.invoke(app, ["sweep", "-c", str(path), "--status"])
    assert result.exit_code == 0, result.output
    assert "3 running" in result.output and "1 interrupted" in result.output
    report = build_report(tmp_path / "out", plots=False)
    assert {r.seed: r.status for r in report.runs} == {1: "running", 2: "interrupted", 3: "running", 4: "running"}
    cell = report.tables[0].cell("tnews", "none")
    assert cell.interrupted == [2] and cell.running == [1, 3, 4]


def test_a_run_whose_job_is_still_queued_is_not_started_again(tmp_path, monkeypatch):
    import clue_adv.sweep.slurm
    from clue_adv.sweep import submission

    path = write_sweep(tmp_path, {"seeds": [1], "strategies": [{"name": "none"}, {"name": "fgm"}]})
    cells = load_plan(path).cells
    _fake_run(cells[1], "running", job="9_1")
    monkeypatch.setattr(clue_adv.sweep.slurm, "slurm_queue", lambda: {"9_1": "RUNNING"})
    plan = load_plan(path)
    todo, queued = submission(plan, force=True)
    assert [c.directory for c in todo] == [cells[0].directory] and list(queued) == [cells[1].directory]
    console = quiet()
    with console.capture() as captured:
        result = run_sweep(plan, console=console)
    assert "1 run(s) are still in the Slurm queue (job 9): not run here" in captured.get()
    assert [(r.cell.directory, r.status) for r in result.results] == [(cells[0].directory, "completed")]
    assert read_summary(cells[1].directory)["status"] == "running"  # left to its job


def test_a_job_that_leaves_the_queue_without_a_result_is_a_failed_run(tmp_path, monkeypatch):
    import clue_adv.sweep.slurm as sweep_module

    path = write_sweep(tmp_path, {"seeds": [1], "strategies": [{"name": "none"}]})
    cell = load_plan(path).cells[0]
    _fake_run(cell, "running", job="5_0")
    log = tmp_path / "5_0_0_log.err"
    log.write_text("tnews/none/seed-1 step 3/10 loss 2.7\n")

    class Paths:
        result_pickle = tmp_path / "5_0_0_result.pkl"  # never written: the job was killed
        stderr = log

    class Job:
        job_id = "5_0"
        paths = Paths()

        def done(self) -> bool:
            return False

    monkeypatch.setattr(sweep_module, "slurm_queue", lambda: {})
    monkeypatch.setattr(sweep_module, "RESULT_GRACE_S", 0.0)
    console = quiet()
    progress = sweep_module.SweepProgress(1, 0, console, show=False)
    result = sweep_module.wait_for_jobs([cell], [Job()], "slurm", progress, console)
    [r] = result.results
    assert r.status == "failed" and r.error.startswith("job 5_0 ended without a result (cancelled")
    assert "its log ends: tnews/none/seed-1 step 3/10" in r.error
    summary = read_summary(cell.directory)
    assert summary["status"] == "failed" and summary["error"] == r.error  # the next sweep reruns it
    assert load_plan(path).cells[0].state == "failed"


def test_the_eta_counts_runs_that_go_side_by_side(tmp_path, monkeypatch):
    """6 runs, 2 at a time, on a fake clock. The first run ends at 100 s while the second (started with it) is
    also 100 s in: 4 runs wait, the running one has nothing left of the mean, 2 workers: (4·100 + 0) / 2 = 200 s
    (elapsed / finished · remaining said 100 · 5 = 500 s). Then a third starts at 100 s and the second ends at
    120 s: mean 110, the third has 110 − 20 = 90 s left, 3 wait: (3·110 + 90) / 2 = 210 s. Without starts (a
    scheduler placed the runs) the overall rate stays: 100 / 1 · 5 = 500 s."""
    import io

    import clue_adv.sweep.outcome as outcome

    cells = load_plan(write_sweep(tmp_path, {"strategies": [{"name": "none"}], "seeds": 6})).cells
    clock = [0.0]
    monkeypatch.setattr(outcome.time, "perf_counter", lambda: clock[0])
    screen = io.StringIO()
    progress = outcome.SweepProgress(6, 0, Console(file=screen, width=200), show=False)
    with progress:
        progress.started(cells[0])
        progress.started(cells[1])
        clock[0] = 100.0
        progress.finished(outcome.CellResult(cells[0], "completed", 100.0))
        assert progress.eta() == "3m20s"
        progress.started(cells[2])
        clock[0] = 120.0
        progress.finished(outcome.CellResult(cells[1], "completed", 120.0))
        assert progress.eta() == "3m30s"
    assert [line.rsplit("ETA ", 1)[1] for line in screen.getvalue().splitlines() if "ETA" in line] == [
        "3m20s",
        "3m30s",
    ]
    clock[0] = 0.0
    scheduled = outcome.SweepProgress(6, 0, quiet(), show=False)
    with scheduled:
        clock[0] = 100.0
        scheduled.finished(outcome.CellResult(cells[0], "completed", 100.0))
        assert scheduled.eta() == "8m20s"


def test_progress_bars_on_a_terminal_nest_a_runs_bar_inside_the_sweeps(tmp_path):
    """On a terminal a one-job sweep shows its own bar with each run's bar inside it (a second live display:
    rich < 14.1 raised LiveError for every run here, which the plain-text path never exercised)."""
    import io

    path = write_sweep(tmp_path, {"strategies": [{"name": "none"}], "seeds": 2})
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160)
    result = run_sweep(load_plan(path), console=console, show_progress=True)
    assert result.exit_code == 0, [r.error for r in result.results]
    assert [r.status for r in result.results] == ["completed", "completed"]
    text = screen.getvalue()
    assert "\x1b[" in text  # drawn as a live terminal display, not the plain lines
    assert "ep 1/" in text  # a run's bar (its info column) was drawn inside the sweep's display


def test_status_names_a_holdout_accuracy_as_such(tmp_path):
    """A selection sweep evaluates on a holdout carved from train: its status must not call that number dev."""
    import clue_adv.sweep.status as sweep_module

    holdout = {"data": {"holdout_size": 100, "eval_split": "holdout"}}
    path = write_sweep(tmp_path, {"seeds": [1], "strategies": [{"name": "none"}], "overrides": {**TINY, **holdout}})
    (cell,) = load_plan(path).cells
    _fake_run(cell, "completed", best_dev_accuracy=0.4321)
    (status,) = sweep_module.sweep_status(load_plan(path))
    assert status.detail == "best holdout 43.21"


def test_two_sweep_files_into_one_experiment_keep_both_plans_in_the_manifest(tmp_path):
    """The proxy study's tier 1 and tier 2 are two sweep files writing one experiment: planning tier 2 must not drop
    tier 1's unstarted cells from the report, while rerunning a sweep file replaces its own cells (a seed removed
    from it is no longer planned)."""
    from clue_adv.report import build_report
    from clue_adv.sweep import write_manifests

    tier1 = write_sweep(tmp_path, {"seeds": 3, "strategies": [{"name": "none"}]}, name="tier1.yaml")
    tier2 = write_sweep(tmp_path, {"seeds": 2, "strategies": [{"name": "gaussian_noise", "sigma": 0.1}]}, "t2.yaml")
    root = tmp_path / "out" / "sw"
    write_manifests(load_plan(tier1))
    # a manifest from before cells recorded their sweep file: its cells belong to the manifest's `sweep`
    old = json.loads((root / "sweep.json").read_text(encoding="utf-8"))
    for cell in old["cells"]:
        del cell["sweep"]
    (root / "sweep.json").write_text(json.dumps(old), encoding="utf-8")
    write_manifests(load_plan(tier2))

    def not_started() -> set[tuple[str, int]]:
        report = build_report(tmp_path / "out", plots=False)
        return {(r.strategy, r.seed) for r in report.runs if r.status == "not started"}

    noise = {("gaussian_noise", 1), ("gaussian_noise", 2)}
    assert not_started() == {("none", 1), ("none", 2), ("none", 3)} | noise
    cells = json.loads((root / "sweep.json").read_text(encoding="utf-8"))["cells"]
    assert [(c["sweep"], c["run_dir"]) for c in cells][:3] == [(str(tier1), f"tnews/none/seed-{k}") for k in (1, 2, 3)]

    # tier 1 edited to two seeds and rerun: its seed 3 is no longer planned; tier 2's cells stay
    write_sweep(tmp_path, {"seeds": 2, "strategies": [{"name": "none"}]}, name="tier1.yaml")
    write_manifests(load_plan(tier1))
    assert not_started() == {("none", 1), ("none", 2)} | noise


def test_the_manifest_keeps_every_sweep_command_with_its_machine_and_the_report_lists_them(tmp_path, monkeypatch):
    """Each `clue-adv sweep` appends its command line, date, machine and --jobs to the experiment's manifest; a
    manifest from before commands were recorded leaves its sweep file in the history; the report shows them."""
    import shlex
    import sys

    from clue_adv.report import build_report

    path = write_sweep(tmp_path, {"seeds": 1, "strategies": [{"name": "none"}]})
    root = tmp_path / "out" / "sw"
    root.mkdir(parents=True)
    old = {"experiment": "sw", "sweep": "sweeps/old.yaml", "written_at": "2026-01-02T03:04:05+00:00", "cells": []}
    (root / "sweep.json").write_text(json.dumps(old), encoding="utf-8")
    argvs = (["sweep", "-c", str(path)], ["sweep", "-c", str(path), "--jobs", "1"])
    for argv in argvs:
        monkeypatch.setattr(sys, "argv", ["/opt/venv/bin/clue-adv", *argv])  # as a shell starts it
        result = runner.invoke(app, argv)
        assert result.exit_code == 0, result.output
    history = json.loads((root / "sweep.json").read_text(encoding="utf-8"))["invocations"]
    assert [h["sweep"] for h in history] == ["sweeps/old.yaml", str(path), str(path)]
    assert history[0]["command"] is None and history[0]["at"] == old["written_at"]
    assert [h["command"] for h in history[1:]] == [shlex.join(["clue-adv", *argv]) for argv in argvs]
    assert [h["jobs"] for h in history[1:]] == [1, 1] and all(h["executor"] == "local" for h in history[1:])
    host = history[1]["host"]
    assert host["cpu_cores"] == os.cpu_count() and host["torch_threads"] >= 1 and host["cpu"]

    # another experiment's manifest in the same place does not pass its history on
    other = {"experiment": "elsewhere", "invocations": [{"command": "clue-adv sweep -c x.yaml"}], "cells": []}
    (root / "sweep.json").write_text(json.dumps(other), encoding="utf-8")
    monkeypatch.setattr(sys, "argv", ["clue-adv", *argvs[0]])
    assert runner.invoke(app, argvs[0]).exit_code == 0
    assert [h["command"] for h in json.loads((root / "sweep.json").read_text())["invocations"]] == [
        shlex.join(["clue-adv", *argvs[0]])
    ]

    # the report lists the commands and the run's machine and measured time
    (root / "sweep.json").write_text(json.dumps(old | {"invocations": history}), encoding="utf-8")
    report = build_report(tmp_path / "out", plots=False)
    text = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    section = text[text.index("### How these runs were made") :]
    assert "`sweeps/old.yaml`: its command line and machine were not recorded" in section
    assert f"`{history[1]['command']}` — started " in section and f"`{history[2]['command']}` — started " in section
    summary = report.runs[0].summary
    assert summary["eval_wall_time_s"] > 0 and summary["host"]["cpu"] == host["cpu"]
    assert f"- machine: {host['cpu']}, {os.cpu_count()} cores (1 run)" in section
    assert f"training {summary['train_wall_time_s'] / 3600:.2f} h" in section and "of CPU cores" in section
