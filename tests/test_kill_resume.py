"""kill -9 at random moments: the resumed sweep completes every run exactly once, files are never half-written,
and the report equals that of an uninterrupted sweep (same seeds => same numbers)."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import sigint_ignored_as_in_a_background_job

from clue_adv.data import ASSETS
from clue_adv.report import build_tables, collect_runs, render

pytestmark = pytest.mark.slow

RUN = f"""\
experiment: kill
task: tnews
data: {{path: {ASSETS / "tnews"}, max_train_samples: 192, max_eval_samples: 64}}
model:
  name_or_path: {ASSETS / "tokenizer"}
  init: random
  architecture: {{num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}}
max_length: 32
epochs: 2
optim: {{lr: 1.0e-3}}
log_every_n_steps: 1
"""
SWEEP = """\
base: run.yaml
seeds: 2
strategies:
  - name: none
  - name: fgm
    epsilon: 0.1
    epsilon_unit: relative
"""


def _sweep(config: Path, out: Path, *extra: str, report: bool = False) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "clue_adv", "sweep", "-c", str(config), "-o", str(out), *extra]
    cmd += [] if report else ["--no-report"]
    # Its own process group, so the kill reaches any child too. SIGINT ignored, as a script's background job or a
    # CI runner starts it (whatever pytest inherited): the workers must stop all the same.
    return subprocess.Popen(
        cmd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        preexec_fn=sigint_ignored_as_in_a_background_job,
    )


def _files_whole(out: Path) -> None:
    for summary in out.rglob("summary.json"):
        json.loads(summary.read_text())  # atomic: never a torn file
    for metrics in out.rglob("metrics.jsonl"):
        lines = metrics.read_text().split("\n")
        for line in lines[:-1]:  # every newline-terminated line is whole JSON; only the very last may be cut
            json.loads(line)
    for table in out.rglob("*.csv"):  # the report's files: atomic, so whole (header and rows of equal width)
        text = table.read_text()
        rows = list(csv.reader(io.StringIO(text)))
        assert text.endswith("\n") and rows and all(len(r) == len(rows[0]) for r in rows), table


def _completed(out: Path) -> dict[str, str]:
    done = {}
    for summary in out.rglob("summary.json"):
        s = json.loads(summary.read_text())
        if s["status"] == "completed":
            done[str(summary.parent.relative_to(out))] = s["started_at"] + s["finished_at"]
    return done


def _running(out: Path) -> list[Path]:
    return [p.parent for p in out.rglob("summary.json") if json.loads(p.read_text())["status"] == "running"]


def _tables(out: Path) -> str:
    tables = build_tables(collect_runs(out))
    return render(tables, "md", "best") + render(tables, "md", "final")


def test_random_kills_then_resume_gives_the_uninterrupted_result(tmp_path):
    (tmp_path / "run.yaml").write_text(RUN)
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP)

    reference = _sweep(config, tmp_path / "ref")
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]

    out = tmp_path / "out"
    rng = random.Random(7)
    seen_completed: dict[str, str] = {}
    cut_short = 0
    for attempt in range(4):
        # Every other sweep writes its report at the end, so a later kill can also land between runs or in the
        # report's writing, not only inside a run.
        proc = _sweep(config, out, report=attempt % 2 == 1)
        # Strike at a random moment after a run is in progress (start-up alone takes seconds): within a second
        # (inside that run) for the first two kills, within three (possibly later runs, the report) after.
        deadline = time.monotonic() + 120
        while not _running(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 1.0 if attempt < 2 else 3.0))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        cut_short += bool(_running(out))  # a run left marked running: killed mid-run
        _files_whole(out)
        now = _completed(out)
        # a run completed before a kill is never run again
        assert all(now[k] == v for k, v in seen_completed.items())
        seen_completed = now
    assert cut_short >= 2, "the kills did not land inside runs; the test would prove nothing"

    final = _sweep(config, out, report=True)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()[-2000:]
    done = _completed(out)
    assert len(done) == 4
    assert all(done[k] == v for k, v in seen_completed.items()), "a completed run was rerun"
    assert _tables(out) == _tables(tmp_path / "ref")
    _files_whole(out)
    assert (out / "kill" / "report.md").is_file() and (out / "kill" / "runs.csv").is_file()


def _status(directory: Path) -> str:
    return json.loads((directory / "summary.json").read_text())["status"]


@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_kill_9_of_a_parallel_sweep_stops_its_workers(tmp_path, how):
    """Workers run in their own session; kill -9 of the sweep must still stop them (marked interrupted), or they
    would train on and a rerun would start a second writer into the same run directory. A plain kill (SIGTERM)
    stops the sweep, which stops its workers. Both with SIGINT inherited as ignored (see _sweep)."""
    (tmp_path / "run.yaml").write_text(RUN.replace("epochs: 2", "epochs: 20"))  # long enough to be caught mid-run
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP)
    out = tmp_path / "out"
    proc = _sweep(config, out, "--jobs", "2")
    deadline = time.monotonic() + 120
    while not _running(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    victims = _running(out)
    assert victims, "no run started"
    if how == "SIGTERM":
        proc.send_signal(signal.SIGTERM)
        # the sweep waits for its workers (60 s at most, then kill -9 leaves a run 'running')
        assert proc.wait(timeout=90) == 130, proc.stderr.read().decode()[-2000:]
        assert [_status(v) for v in victims] == ["interrupted"] * len(victims)
        return
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 60
    while any(_status(v) == "running" for v in victims) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [_status(v) for v in victims] == ["interrupted"] * len(victims)
    _files_whole(out)
    final = _sweep(config, out, "--jobs", "2")
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()[-2000:]
    assert len(_completed(out)) == 4
