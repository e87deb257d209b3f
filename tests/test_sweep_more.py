"""Sweeps, further: what `--devices` gives each worker, `--force` through the CLI, a sweep that goes on after
one run runs out of memory, and fuzzed sweep files through `sweep --dry-run`."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_RUN
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from typer.testing import CliRunner

import clue_adv.sweep.local
from clue_adv.cli import app
from clue_adv.data import ASSETS
from clue_adv.rundir import read_summary
from clue_adv.sweep import available_cores, core_sets, load_plan, run_sweep
from clue_adv.train import OOM_ADVICE

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
SHIPPED_SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_sweep(tmp_path: Path, body: dict) -> Path:
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
    path = tmp_path / "sweeps" / "sweep.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump({"base": "../configs/tiny.yaml", "overrides": dict(TINY_RUN), **body}))
    return path


def quiet() -> Console:
    return Console(stderr=True, force_terminal=False, width=200)


# --------------------------------------------------------------------------------------------------
# --devices / core pinning, seen from inside the worker

# The worker as the sweep starts it (`python -m clue_adv.sweep CONFIG`), with train replaced by a probe that
# records what the worker was given after worker_main applied it: affinity, threads, visible GPU.
PROBE = textwrap.dedent(
    """
    import os, sys
    import torch
    import clue_adv.train
    from clue_adv.rundir import atomic_write_json, run_dir

    def probe(cfg, *args, **kwargs):
        directory = run_dir(cfg).resolve()
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_json(directory / "probe.json", {
            "affinity": sorted(os.sched_getaffinity(0)),
            "torch_threads": torch.get_num_threads(),
            "omp": os.environ.get("OMP_NUM_THREADS"),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "given_gpu": os.environ.get("CLUE_ADV_GIVEN_GPU"),
        })
        summary = {"status": "completed"}
        atomic_write_json(directory / "summary.json", summary)
        return clue_adv.train.RunOutcome(directory, summary)

    clue_adv.train.train = probe
    torch.cuda.is_available, torch.cuda.device_count = lambda: True, lambda: 1  # the GPU it was given, on any machine
    from clue_adv.sweep import worker_main
    sys.exit(worker_main(sys.argv[1:]))
    """
)


@pytest.mark.skipif(not hasattr(__import__("os"), "sched_getaffinity"), reason="no CPU affinity on this system")
def test_devices_give_each_worker_its_gpu_and_its_share_of_the_cores(tmp_path, monkeypatch):
    real_popen = subprocess.Popen
    commands = []

    def popen(command, *args, **kwargs):
        if command[1:3] == ["-m", "clue_adv.sweep"]:  # a sweep worker: the same worker, with the probe
            commands.append(command)
            command = [command[0], "-c", PROBE, *command[3:]]
        return real_popen(command, *args, **kwargs)

    monkeypatch.setattr(clue_adv.sweep.local.subprocess, "Popen", popen)
    # The sweep runs in a job given physical GPUs 2, 3, 5 and 7 (as Slurm sets it): --devices 1,2 are its second
    # and third, physical 3 and 5 (it used to hand the workers 1 and 2, someone else's GPUs).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3,5,7")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    path = write_sweep(tmp_path, {"seeds": [1, 2]})
    result = runner.invoke(app, ["sweep", "-c", str(path), "--devices", "1,2", "--no-report"])
    assert result.exit_code == 0, result.output
    assert len(commands) == 2
    slots = core_sets(available_cores(), 2)  # --devices 1,2 means two workers, one per device
    cells = load_plan(path).cells
    assert [c.config.seed for c in cells] == [1, 2]
    for cell, device, cores in zip(cells, ["3", "5"], slots, strict=True):
        seen = json.loads((cell.directory / "probe.json").read_text())
        assert seen == {
            "affinity": sorted(cores),
            "torch_threads": len(cores),
            "omp": str(len(cores)),
            "cuda_visible_devices": device,
            "given_gpu": device,
        }, cell.name
        # ... and the worker's log says so, for a user checking the pinning after the fact
        cpus = ",".join(str(c) for c in sorted(cores))
        log = (cell.directory / "train.log").read_text()
        assert f"worker: cpus {cpus} ({len(cores)} threads), CUDA_VISIBLE_DEVICES={device}" in log, log


@pytest.mark.parametrize(
    ("inherited", "present", "devices", "expected"),
    [
        (None, 4, ["0", "3"], ["0", "3"]),  # nothing inherited: the ids are the machine's GPUs
        ("4,6,7", 3, ["2", "0"], ["7", "4"]),  # inherited: index into the job's list, in the order asked
        ("GPU-aa,GPU-bb", 2, ["1"], ["GPU-bb"]),  # UUIDs pass through as they were given
        ("4, 6", 2, ["1", "1"], ["6", "6"]),  # two runs on one GPU stays possible
    ],
)
def test_device_ids_index_the_gpus_the_sweep_sees(monkeypatch, inherited, present, devices, expected):
    from clue_adv.sweep import worker_gpus

    if inherited is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", inherited)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: present)
    assert worker_gpus(devices) == expected


@pytest.mark.parametrize(
    ("inherited", "present", "devices", "message"),
    [
        (None, 0, "0", "--devices 0: this machine has no GPU to give the runs (CUDA finds no GPU)"),
        ("", 0, "0", "CUDA_VISIBLE_DEVICES='' hides every GPU"),
        (None, 2, "0,2", "--devices 0,2: there is no GPU 2; 2 GPU(s) are visible, indices 0 to 1; nothing was run"),
        # the job was given 2 GPUs of a node of 8: index 2 is not the job's, whatever the node has
        ("4,6", 2, "2", "indices 0 to 1 (CUDA_VISIBLE_DEVICES=4,6 is inherited: --devices indexes into it)"),
        (None, 2, "0,-1", "'-1' is not a GPU index"),
        (None, 2, "cuda:0", "'cuda:0' is not a GPU index"),
    ],
)
def test_devices_not_present_are_refused_before_anything_runs(
    tmp_path, monkeypatch, inherited, present, devices, message
):
    """`--devices 0` without CUDA used to train every run on the CPU and exit 0."""
    import clue_adv.sweep.outcome

    if inherited is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", inherited)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: present)
    monkeypatch.setattr(clue_adv.sweep.local.subprocess, "Popen", lambda *a, **k: pytest.fail("a worker started"))
    monkeypatch.setattr(clue_adv.sweep.outcome, "train", lambda *a, **k: pytest.fail("a run started"))
    path = write_sweep(tmp_path, {"seeds": [1, 2]})
    result = runner.invoke(app, ["sweep", "-c", str(path), "--devices", devices], terminal_width=300)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # not even the manifest


def test_devices_with_runs_set_to_the_cpu_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    path = write_sweep(tmp_path, {"seeds": [1], "overrides": {**TINY_RUN, "device": "cpu"}})
    result = runner.invoke(app, ["sweep", "-c", str(path), "--devices", "0"], terminal_width=300)
    assert result.exit_code == 2, result.output
    assert "1 run(s) set device: cpu (e.g. sw/tnews/none/seed-1)" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "out").exists()


def test_a_worker_given_a_gpu_it_cannot_see_fails_instead_of_training_on_the_cpu(tmp_path, monkeypatch):
    """The sweep checked the id, but the worker's process finds no CUDA (here: an id CUDA does not know, on any
    machine): the run fails with that reason and nothing trains (`device: auto` used to fall back to the CPU)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-00000000-0000-0000-0000-000000000000")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # the sweep's own check believes it
    path = write_sweep(tmp_path, {"seeds": [1]})
    result = run_sweep(load_plan(path), devices=["0"], console=quiet(), show_progress=False)
    assert result.exit_code == 1
    [failed] = result.results
    assert failed.status == "failed"
    assert "this run was given GPU GPU-00000000" in failed.error and "not trained on the CPU" in failed.error
    summary = read_summary(failed.cell.directory)
    assert summary["status"] == "failed" and summary["failed_stage"] == "setup"
    assert "steps" not in summary and not (failed.cell.directory / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------------------
# --force through the CLI; a run out of memory does not stop the sweep


def test_cli_force_reruns_completed_cells(tmp_path, monkeypatch):
    import clue_adv.sweep.outcome

    path = write_sweep(tmp_path, {"seeds": [1, 2]})
    args = ["sweep", "-c", str(path), "--no-report"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    cells = load_plan(path).cells
    assert all(c.done for c in cells)
    # Not started_at (whole seconds): a rerun within the same second would look like no rerun.
    before = {c.directory: (c.directory / "summary.json").read_bytes() for c in cells}
    stamps = {d: (d / "summary.json").stat().st_mtime_ns for d in before}

    ran = []
    real_train = clue_adv.sweep.outcome.train

    def recording_train(cfg, *a, **kw):
        ran.append((cfg.seed, kw.get("force")))
        return real_train(cfg, *a, **kw)

    monkeypatch.setattr(clue_adv.sweep.outcome, "train", recording_train)
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "2 skipped" in again.output, again.output
    assert all((d / "summary.json").read_bytes() == b for d, b in before.items())  # nothing rerun

    forced = runner.invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert "2 completed" in forced.output and "0 skipped" in forced.output, forced.output
    assert sorted(r for r in ran if r[1]) == [(1, True), (2, True)]
    assert all(read_summary(d)["status"] == "completed" for d in before)
    assert all((d / "summary.json").stat().st_mtime_ns != t for d, t in stamps.items())  # both trained again


def test_a_run_out_of_memory_fails_with_advice_and_the_sweep_goes_on(tmp_path, monkeypatch):
    from clue_adv.regularizers.gaussian_noise import GaussianNoise

    def out_of_memory(self, ctx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(GaussianNoise, "training_step", out_of_memory)
    path = write_sweep(tmp_path, {"seeds": [1], "strategies": [{"name": "gaussian_noise"}, {"name": "none"}]})
    result = run_sweep(load_plan(path), jobs=1, console=quiet())
    assert result.exit_code == 1 and not result.interrupted
    by_strategy = {r.cell.config.strategy.name: r for r in result.results}
    oom = by_strategy["gaussian_noise"]
    assert oom.status == "failed" and "out of memory" in oom.error and OOM_ADVICE in oom.error
    summary = read_summary(oom.cell.directory)
    assert summary["status"] == "failed" and summary["error"] == "out of memory" and summary["advice"] == OOM_ADVICE
    assert by_strategy["none"].status == "completed"
    assert read_summary(by_strategy["none"].cell.directory)["status"] == "completed"


# --------------------------------------------------------------------------------------------------
# Fuzzed sweep files: `sweep --dry-run` answers exit 0 or exit 2 with a message, never a traceback


def _paths(node, prefix=()):
    """Every path in a nested mapping/list (list items by index), blocks included."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.integers(-(2**70), 2**70),  # beyond int64 and the seeding range
    st.sampled_from(["~no-such-user-x/a", "~", "../..", "/", "x" * 300]),  # paths and names
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.one_of(st.integers(-3, 3), st.text(max_size=4)), max_size=3),
    st.dictionaries(st.text(max_size=6), st.one_of(st.integers(), st.text(max_size=4)), max_size=2),
    st.sampled_from(["tnews", "iflytek", "fgm", "none", "gaussian_noise", "seed", "epochs", "optim.lr", "epsilon"]),
)


@st.composite
def mutated_sweeps(draw):
    path = draw(st.sampled_from(SHIPPED_SWEEPS))
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if isinstance(data.get("base"), str):  # the mutant lives elsewhere: keep its base file found
        data["base"] = str((path.parent / data["base"]).resolve())
    for _ in range(draw(st.integers(1, 3))):
        keys = list(_paths(data))
        if not keys:
            break
        target = list(draw(st.sampled_from(keys)))
        node = data
        for k in target[:-1]:
            node = node[k]
        kind = draw(st.sampled_from(["replace", "delete", "add"]))
        if kind == "replace":
            node[target[-1]] = draw(values)
        elif kind == "delete":
            node.pop(target[-1])
        elif isinstance(node, dict):
            node[draw(st.text(min_size=1, max_size=10))] = draw(values)
        else:
            node.append(draw(values))
    return data


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated_sweeps())
def test_mutated_sweeps_dry_run_or_fail_with_exit_2(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("mutsweep")
    f = folder / "s.yaml"
    f.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    result = runner.invoke(app, ["sweep", "-c", str(f), "--dry-run", "-o", str(folder / "out")])
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert result.output.strip(), "exit 2 without a message"
    assert not (folder / "out").exists()  # a dry run writes nothing


def test_sweep_checks_the_data_contents_before_any_run_starts(tmp_path):
    # Both tasks read the TNEWS sample: the IFLYTEK cells would find 15 labels where IFLYTEK has 119.
    path = write_sweep(tmp_path, {"tasks": ["tnews", "iflytek"], "seeds": [1, 2]})
    dry = runner.invoke(app, ["sweep", "-c", str(path), "--dry-run"])
    assert dry.exit_code == 2, dry.output
    assert "iflytek has 119 labels" in dry.output and "4 planned" in dry.output  # the plan, then the problem
    assert (
        "sw/iflytek/none/seed-1, sw/iflytek/none/seed-2" in dry.output
        and "sw/tnews/" not in dry.output.split("error:")[-1]
    )
    result = runner.invoke(app, ["sweep", "-c", str(path)])
    assert result.exit_code == 2, result.output
    assert "no run was started" in result.output and "iflytek has 119 labels" in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # not even the TNEWS cells ran

    # A malformed line in a copy of the sample: named, with its file, before anything runs.
    data = tmp_path / "tnews"
    data.mkdir()
    for name in ("train.json", "labels.json"):
        (data / name).write_bytes((ASSETS / "tnews" / name).read_bytes())
    dev = (ASSETS / "tnews" / "dev.json").read_text(encoding="utf-8").splitlines()
    (data / "dev.json").write_text("\n".join(["{not json", *dev[1:]]) + "\n", encoding="utf-8")
    path = write_sweep(tmp_path, {"seeds": [1], "overrides": {**TINY_RUN, "data.path": str(data)}})
    result = runner.invoke(app, ["sweep", "-c", str(path)])
    assert result.exit_code == 2, result.output
    assert "dev.json" in result.output and "sw/tnews/none/seed-1" in result.output
    assert not (tmp_path / "out").exists()


def test_jobs_beyond_devices_and_local_placement_options_with_a_scheduler_get_a_note(tmp_path, monkeypatch):
    import io

    from rich.console import Console

    from clue_adv.sweep import load_plan, run_sweep

    path = write_sweep(tmp_path, {"strategies": [{"name": "none"}], "seeds": 1})
    assert run_sweep(load_plan(path), show_progress=False).exit_code == 0

    def notes(**kwargs) -> str:
        screen = io.StringIO()
        run_sweep(load_plan(path), show_progress=False, console=Console(file=screen, width=300), **kwargs)
        return screen.getvalue()

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)  # the cells are completed: no worker starts
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert "up to 2 runs share a GPU" in notes(devices=["0"], jobs=2)
    assert "the scheduler places them" in notes(executor="submitit-local", jobs=2)
    assert "note:" not in notes(devices=["0", "1"], jobs=2)


def test_log_tail_reads_the_latest_session_only(tmp_path):
    """A resumed run's train.log holds every session: the error it reports is the latest session's, not an old one."""
    from clue_adv.sweep.outcome import SESSION_MARK, log_tail

    log = tmp_path / "train.log"
    log.write_text("worker: cpus 0\nerror: out of memory\n")
    assert log_tail(log) == "out of memory"  # a log from before session marks: all of it
    log.write_text(f"{SESSION_MARK} t1\nerror: out of memory\n{SESSION_MARK} t2\nworker: cpus 0\nepoch 3 of 10\n")
    assert log_tail(log) == "epoch 3 of 10"
    log.write_text(f"{SESSION_MARK} t1\nstep 5\n{SESSION_MARK} t2\nerror: disk full\nlast words\n")
    assert log_tail(log) == "disk full"
    log.write_text(f"{SESSION_MARK} t1\nerror: old\n{SESSION_MARK} t2\n")
    assert log_tail(log) == ""
