"""The sweep's Slurm executor against a real single-node Slurm (scripts/local-slurm.sh, started by the
`slurm_cluster` fixture; every test here skips with the reason where it cannot start).

What is proven: the smoke sweep goes out as one job array through submitit and every run completes exactly
once, with its logs beside its directory; the report equals that of the same sweep run locally; a second
`sweep` submits nothing; a run killed with `scancel` mid-run is noticed by the waiting sweep, and the next
sweep reruns it and nothing else; a sweep started while a run is still in the queue waits for that job
instead of submitting it again. Each `clue-adv` call is a subprocess run from the repository root (the smoke
config's data paths are relative) under a timeout, so a hang fails the test instead of stalling CI."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
import yaml
from conftest import TINY_RUN, sigint_as_in_a_terminal
from slurm_cluster import slurm_cluster  # noqa: F401 - fixture

from clue_adv.report import build_tables, collect_runs, render
from clue_adv.rundir import read_summary
from clue_adv.sweep import SLURM_LOGS, SLURM_RECORD, Cell, load_plan, run_sweep

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]
T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
# The smoke sweep at test size: 128 training examples, one layer of width 32, one epoch (about 10 s a job,
# most of it Python start-up). One core and 1 GB per job: two jobs at once on a 2-core node.
TINY = {**TINY_RUN, "data.max_train_samples": 128}
SLURM = {"cpus_per_task": 1, "gpus_per_node": 0, "mem_gb": 1, "time_min": 10, "array_parallelism": 2}


def write_sweep(path: Path, **overrides: object) -> Path:
    """sweeps/smoke.yaml with its first two strategies (none, FGM), 2 seeds, the tiny model, a 1-core job."""
    sweep = yaml.safe_load((REPO / "sweeps" / "smoke.yaml").read_text())
    sweep["base"] = str(REPO / "configs" / "smoke.yaml")
    sweep["strategies"] = sweep["strategies"][:2]
    sweep["overrides"] = {**TINY, **overrides}
    sweep["slurm"] = SLURM
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def _env() -> dict[str, str]:
    # COLUMNS: rich tables wide enough that a cell's text stays on one line
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "COLUMNS": "300"}


def clue_adv(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clue_adv", *args], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout
    )


def sweep_cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "-c", str(config), "-o", str(out), "--executor", "slurm", "--no-report", *extra]


def start_sweep(config: Path, out: Path, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "clue_adv", *sweep_cmd(config, out)]
    with open(log, "w") as f:
        # SIGINT at its default, as from a terminal: a test sends it as Ctrl-C
        return subprocess.Popen(
            command, cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT, preexec_fn=sigint_as_in_a_terminal
        )


def wait_for(what: str, check: Callable[[], T], timeout: float = 120, every: float = 0.1) -> T:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"waited {timeout} s for {what}")


def jobs_in_queue() -> dict[str, str]:
    """Jobs and array tasks in the queue -> state; a whole job's id too (`12` for `12_0`)."""
    listing = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], capture_output=True, text=True, timeout=30)
    assert listing.returncode == 0, listing.stderr
    jobs = {}
    for line in listing.stdout.splitlines():
        job, state = line.split()
        jobs[job] = jobs[job.split("_")[0]] = state
    return jobs


def sbatch(*args: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", *args], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def next_job_id() -> int:
    """Submit a no-op to read the next job id: two probes one apart mean nothing was submitted in between."""
    return int(sbatch("--wrap", "true"))


def run_state(config: Path, out: Path) -> dict[str, tuple[str | None, str | None, str | None]]:
    """Per run: (status, started_at, job id of its last submission)."""
    state = {}
    for cell in load_plan(config, out).cells:
        summary = read_summary(cell.directory) or {}
        record_file = cell.directory / SLURM_RECORD
        job = json.loads(record_file.read_text())["job_id"] if record_file.is_file() else None
        state[cell.name] = (summary.get("status"), summary.get("started_at"), job)
    return state


def tables(root: Path) -> list[str]:
    runs = collect_runs(root)
    return [render(build_tables(runs), "json", metric) for metric in ("best", "final")]


@pytest.fixture(scope="module")
def smoke(slurm_cluster, tmp_path_factory):  # noqa: F811
    """The smoke sweep run once through Slurm: (sweep file, output dir, the sweep's output)."""
    pytest.importorskip("submitit")
    root = tmp_path_factory.mktemp("slurm-smoke")
    config = write_sweep(root / "smoke-slurm.yaml")
    out = root / "out"
    start = time.perf_counter()
    result = clue_adv(*sweep_cmd(config, out))
    print(f"smoke sweep on Slurm: {time.perf_counter() - start:.0f} s")
    assert result.returncode == 0, result.stderr[-3000:]
    return config, out, result.stderr


def test_the_smoke_sweep_runs_as_one_job_array_and_each_run_completes_once(smoke):
    config, out, log = smoke
    submitted = re.search(r"submitted (\d+) run\(s\) as job (\d+) \(slurm\)", log)
    assert submitted and submitted.group(1) == "4", log
    job = submitted.group(2)
    assert "4 completed, 0 skipped, 0 failed" in log
    plan = load_plan(config, out)
    assert len(plan.cells) == 4 and len({c.config.strategy.name for c in plan.cells}) == 2
    assert all(c.state == "completed" for c in plan.cells)
    for index, cell in enumerate(plan.cells):
        record = json.loads((cell.directory / SLURM_RECORD).read_text())
        assert record["executor"] == "slurm" and record["job_id"] == f"{job}_{index}"  # array task i = cell i
        stdout, stderr = (cell.directory / SLURM_LOGS["stdout"], cell.directory / SLURM_LOGS["stderr"])
        # The logs beside the run directory are that array task's own.
        assert stdout.resolve() == Path(record["stdout"]) and stdout.resolve().parent.name == f"{job}_{index}"
        assert stdout.read_text().count("Starting with JobEnvironment") == 1  # started once, never requeued
        run = f"tnews/{cell.directory.parent.name}/seed-{cell.config.seed}"
        assert f"{run} epoch 1: dev accuracy" in stderr.read_text()
        evals = [json.loads(line) for line in (cell.directory / "metrics.jsonl").read_text().splitlines()]
        assert [e["epoch"] for e in evals if e["type"] == "eval"] == [1]  # one run's worth of metrics
    # submitit's folders: one per array task (pickles, logs), one for the array (its sbatch script).
    task_dirs = sorted(p.name for p in (out / "smoke" / "slurm").iterdir() if p.is_dir())
    assert task_dirs == [job] + [f"{job}_{i}" for i in range(4)]
    # The sweep returns once every result file is there; the tasks then leave the queue (nothing requeued).
    wait_for("the array to leave the queue", lambda: not jobs_in_queue(), timeout=60, every=0.5)

    status = clue_adv("sweep", "-c", str(config), "-o", str(out), "--status")
    assert status.returncode == 0, status.stderr
    assert "4 completed, 0 running, 0 pending, 0 failed, 0 interrupted, 0 not started" in status.stdout


def test_the_report_equals_that_of_the_same_sweep_run_locally(smoke, tmp_path, monkeypatch):
    import torch

    config, out, _ = smoke
    monkeypatch.chdir(REPO)  # the smoke config's data paths are relative to the repository root
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the 1-CPU jobs: the same reduction order, the same numbers
    try:
        local = run_sweep(load_plan(config, tmp_path / "local"), executor="local", show_progress=False)
    finally:
        torch.set_num_threads(threads)
    assert local.exit_code == 0 and len(local.by_status("completed")) == 4
    on_slurm, here = tables(out / "smoke"), tables(tmp_path / "local" / "smoke")
    assert json.loads(on_slurm[0])[0]["rows"][0]["n"] == 2
    assert on_slurm == here
    for cell in load_plan(config, out).cells:
        twin = tmp_path / "local" / cell.directory.relative_to(out)
        assert read_summary(cell.directory)["dev_history"] == read_summary(twin)["dev_history"]


def test_a_second_sweep_submits_nothing(smoke):
    config, out, _ = smoke
    before = run_state(config, out)
    records = {p: p.read_bytes() for p in out.rglob(SLURM_RECORD)}
    probe = next_job_id()
    again = clue_adv(*sweep_cmd(config, out))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "submitted" not in again.stderr and "0 completed, 4 skipped, 0 failed" in again.stderr
    assert next_job_id() == probe + 1  # no job was submitted in between
    assert run_state(config, out) == before
    assert {p: p.read_bytes() for p in out.rglob(SLURM_RECORD)} == records

    dry = clue_adv(*sweep_cmd(config, out, "--dry-run"))
    assert dry.returncode == 0 and "4 planned, 4 completed, 0 to run" in dry.stdout
    assert "#SBATCH" not in dry.stdout  # nothing to submit, no script


def test_a_run_killed_with_scancel_is_rerun_by_the_next_sweep_and_nothing_else(slurm_cluster, tmp_path):  # noqa: F811
    pytest.importorskip("submitit")
    # Runs long enough (1500 steps: 9 s at the fastest seen here, 15 s typically) that the kill lands mid-training:
    # submitit's jobs ignore SIGTERM, and the local cluster's SIGKILL follows a scancel by about 5 s.
    config = write_sweep(tmp_path / "kill.yaml", **{"data.max_train_samples": 4000, "epochs": 12})
    out = tmp_path / "out"
    first = start_sweep(config, out, tmp_path / "first.log")
    try:
        plan = load_plan(config, out)

        def training() -> Cell | None:
            for cell in plan.cells:
                summary = read_summary(cell.directory) or {}
                metrics = cell.directory / "metrics.jsonl"
                if summary.get("status") == "running" and metrics.is_file() and metrics.read_text().strip():
                    return cell
            return None

        victim = wait_for("a run to be training", training)
        job = json.loads((victim.directory / SLURM_RECORD).read_text())["job_id"]
        subprocess.run(["scancel", job], check=True, timeout=30)
        # The waiting sweep sees the job leave the queue without a result, marks the run failed, goes on.
        assert first.wait(timeout=150) == 1, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    log = (tmp_path / "first.log").read_text()
    assert f"failed {victim.name}" in log and f"job {job} ended without a result" in log, log[-3000:]
    assert "3 completed, 0 skipped, 1 failed" in log
    after_kill = run_state(config, out)
    assert after_kill[victim.name][0] == "failed"
    trained = sum('"type": "train"' in line for line in (victim.directory / "metrics.jsonl").read_text().splitlines())
    assert 0 < trained < 1500, trained  # killed mid-training
    print(f"killed at step {trained} of 1500")
    assert sorted(s for s, _, _ in after_kill.values()) == ["completed"] * 3 + ["failed"]
    status = clue_adv("sweep", "-c", str(config), "-o", str(out), "--status")
    assert "3 completed, 0 running, 0 pending, 1 failed" in status.stdout, status.stdout
    assert f"job {job} ended without a result" in status.stdout

    # The next sweep resubmits the killed run alone. A job filling the node keeps that rerun pending for as
    # long as this test needs: stop the sweep once it has submitted (the job stays in the queue), look at
    # --status, then start another sweep, which must wait for that job rather than submit the run again.
    blocker = sbatch("--cpus-per-task=2", "--wrap", "sleep 300")
    wait_for("the blocking job to run", lambda: jobs_in_queue().get(blocker) == "RUNNING", timeout=60)
    second = start_sweep(config, out, tmp_path / "second.log")
    try:
        submitted = wait_for(
            "the rerun's submission",
            lambda: re.search(r"submitted 1 run\(s\) as job (\d+)", (tmp_path / "second.log").read_text()),
            timeout=60,
        )
        second.send_signal(signal.SIGINT)
        assert second.wait(timeout=30) == 130
    finally:
        if second.poll() is None:
            second.kill()
    rerun_job = submitted.group(1)
    assert "stopped waiting" in (tmp_path / "second.log").read_text()
    assert jobs_in_queue().get(rerun_job) == "PENDING"
    queued = run_state(config, out)
    assert queued[victim.name][2] == rerun_job  # one run: a plain job, not an array
    assert others(queued, victim) == others(after_kill, victim)
    status = clue_adv("sweep", "-c", str(config), "-o", str(out), "--status")
    assert "3 completed, 0 running, 1 pending, 0 failed" in status.stdout, status.stdout
    assert f"job {rerun_job} waiting in the queue" in status.stdout

    probe = next_job_id()
    third = start_sweep(config, out, tmp_path / "third.log")
    try:
        adopted = f"1 run(s) already in the queue (job {rerun_job})"
        wait_for("the third sweep to plan", lambda: adopted in (tmp_path / "third.log").read_text(), timeout=60)
        subprocess.run(["scancel", blocker], check=True, timeout=30)
        assert third.wait(timeout=150) == 0, (tmp_path / "third.log").read_text()[-3000:]
    finally:
        if third.poll() is None:
            third.kill()
    log = (tmp_path / "third.log").read_text()
    assert "submitted" not in log and "1 completed, 3 skipped, 0 failed" in log, log[-3000:]
    assert next_job_id() == probe + 1  # the third sweep submitted nothing
    final = run_state(config, out)
    assert all(status == "completed" for status, _, _ in final.values())
    assert final[victim.name][1] != after_kill[victim.name][1]  # the killed run ran again, in the rerun's job
    assert final[victim.name][2] == rerun_job
    assert others(final, victim) == others(after_kill, victim)  # nothing else ran again


def others(state: dict, victim: Cell) -> dict:
    return {name: value for name, value in state.items() if name != victim.name}


def test_the_local_cluster_runs_a_job_array(slurm_cluster, tmp_path):  # noqa: F811
    out = tmp_path / "task-%a.out"
    job = subprocess.run(
        ["sbatch", "--parsable", "--array=0-2", "-o", str(out), "--wrap", "echo task $SLURM_ARRAY_TASK_ID"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()
    wait_for(f"job {job} to leave the queue", lambda: job not in jobs_in_queue(), timeout=60, every=0.5)
    assert sorted((tmp_path / f"task-{i}.out").read_text().strip() for i in range(3)) == [
        "task 0",
        "task 1",
        "task 2",
    ]
