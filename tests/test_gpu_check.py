"""scripts/gpu_check.py, the one-shot GPU check: its CPU dry run runs every step and writes the summary; a step that
fails, hangs or finds no GPU is recorded and the others still run."""

from __future__ import annotations

import json
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from conftest import load_script


@pytest.fixture(scope="module")
def gc():
    return load_script("gpu_check")


@pytest.mark.slow  # seven fresh processes, each importing torch and transformers: 45-70 s on 2 busy cores
def test_dry_run_runs_every_step_and_writes_the_summary(gc, tmp_path):
    out, archive = tmp_path / "check", tmp_path / "check.tar.gz"
    code = gc.main(["--dry-run", "--strategies", "fgm", "--output-dir", str(out), "--archive", str(archive)])
    summary = json.loads((out / "summary.json").read_text())
    assert code == 0, {k: s.get("log_tail") for k, s in summary["steps"].items()}
    assert list(summary["steps"]) == list(gc.STEP_NAMES)
    for name, step in summary["steps"].items():
        assert step["status"] == "ok" and step["results"], name
        assert (out / f"{name}.log").is_file()
    steps = summary["steps"]
    assert steps["pytest"]["results"]["counts"]["skipped"] > 0  # the gpu tests were collected, and skip on a CPU
    assert set(steps["syncs"]["results"]["strategies"]) == {"none", "fgm"}
    assert steps["bf16"]["results"]["cases"]["fgm"]["cosine"] is not None
    assert set(steps["strategies"]["results"]["strategies"]) == {"none", "fgm"}
    assert steps["throughput-iflytek"]["results"]["train_samples_per_s"]["clue_adv"] > 0
    md = (out / "summary.md").read_text()
    for heading in ("## CUDA tests", "## Host syncs", "## bf16 vs fp32", "## Strategy cost", "## Fine-tuning"):
        assert heading in md
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert f"{out.name}/summary.md" in names and f"{out.name}/strategies/strategies-cpu.json" in names


def _fake_steps(gc, monkeypatch, tmp_path, commands: dict[str, str]) -> None:
    """Steps replaced by small Python programs; the real collectors read what they leave."""

    def command(step, out, dry_run, strategies=None):
        return [sys.executable, "-c", commands.get(step, "pass")]

    monkeypatch.setattr(gc, "step_command", command)
    monkeypatch.setattr(gc, "STEPS", tuple(gc.Step(s.name, 3, s.what) for s in gc.STEPS))
    monkeypatch.setattr(gc, "MIN_STEP_S", 1)


def env_ok(out: Path) -> str:
    """An env step that found a GPU."""
    found = {"cuda": {"available": True}, "missing": []}
    return f"import json; json.dump({found!r}, open({str(out / 'env.json')!r}, 'w'))"


def test_a_failing_or_hanging_step_is_recorded_and_the_next_still_runs(gc, tmp_path, monkeypatch):
    out = tmp_path / "check"
    pid_file = tmp_path / "grandchild.pid"
    hang = (
        "import subprocess, sys, time; "
        f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); open({str(pid_file)!r}, 'w')"
        ".write(str(p.pid)); time.sleep(60)"
    )
    _fake_steps(
        gc,
        monkeypatch,
        tmp_path,
        {
            "env": env_ok(out),
            "pytest": "import sys; print('boom'); sys.exit(1)",
            "syncs": hang,
        },
    )
    started = time.monotonic()
    code = gc.main(["--output-dir", str(out), "--budget", "60"])
    assert time.monotonic() - started < 40  # the hang was cut at its 3 s limit, not waited out
    assert code == 1
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert list(steps) == list(gc.STEP_NAMES)  # every step had its turn
    assert steps["env"]["status"] == "ok"
    assert steps["pytest"]["status"] == "failed" and "boom" in steps["pytest"]["log_tail"]
    assert steps["syncs"]["status"] == "timed out" and steps["syncs"]["returncode"] is None
    # the hanging step's own child went with it (its process group was killed)
    grandchild = int(pid_file.read_text())
    status = Path(f"/proc/{grandchild}/status")
    deadline = time.monotonic() + 5
    while status.exists() and "zombie" not in status.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not status.exists() or "zombie" in status.read_text()
    # steps that exited 0 without their results count as failed, and say what is missing
    assert steps["bf16"]["status"] == "failed" and "bf16.json" in steps["bf16"]["results_error"]
    md = (out / "summary.md").read_text()
    assert "### pytest: failed" in md and "### syncs: timed out" in md


def test_steps_past_the_budget_are_skipped_not_started(gc, tmp_path, monkeypatch):
    out = tmp_path / "check"
    _fake_steps(
        gc,
        monkeypatch,
        tmp_path,
        {"env": env_ok(out), "pytest": "import time; time.sleep(60)"},
    )
    monkeypatch.setattr(gc, "MIN_STEP_S", 2)
    assert gc.main(["--output-dir", str(out), "--budget", "4"]) == 1
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert steps["pytest"]["status"] == "timed out" and steps["pytest"]["limit_s"] <= 4
    assert all(steps[s]["status"].startswith("skipped: out of time") for s in gc.STEP_NAMES[2:])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_without_a_gpu_and_without_dry_run_it_says_so_and_exits_2(gc, tmp_path, capsys):
    out = tmp_path / "check"
    assert gc.main(["--output-dir", str(out), "--only", "env,pytest"]) == 2
    assert "--dry-run" in capsys.readouterr().err
    steps = json.loads((out / "summary.json").read_text())["steps"]
    assert steps["env"]["results"]["cuda"]["available"] is False
    assert steps["pytest"]["status"] == "skipped: no GPU"
    assert "syncs" not in steps  # not selected


def test_bad_options_are_one_clear_message_and_exit_2(gc, capsys):
    with pytest.raises(SystemExit) as stopped:
        gc.main(["--only", "env,warp"])
    assert stopped.value.code == 2
    assert "unknown step warp" in capsys.readouterr().err


def test_the_bf16_probe_compares_like_with_like(gc, tmp_path):
    """Against itself (fp32 vs fp32) every share agrees exactly: the weights stay put between the four gradients,
    and the random draws (noise, random starts) are the same in each: only precision can move the cosine."""
    probe = gc.bf16_probe_setup(True, "gaussian_noise,pgd")
    for config in ({"name": "gaussian_noise", "sigma": 0.05}, {"name": "pgd", "random_start": True}):
        result = gc.agreement(probe, config, precisions=("fp32", "fp32"))
        assert result["cosine"] == pytest.approx(1.0, abs=1e-12), config
        assert result["relative_difference"] == 0.0
        assert 0 < result["share_of_gradient"] < 10


def test_gpu_test_files_are_the_files_with_the_marker(gc):
    files = gc.gpu_test_files()
    assert "tests/test_gpu.py" in files
    assert "tests/test_gpu_check.py" not in files  # it names the marker in its text, and uses none
    assert all(gc.GPU_MARKER.search((gc.REPO / f).read_text()) for f in files)


def test_every_sync_warning_is_counted_with_its_line(gc):
    """torch reports each sync as the same warning from the same line; Python's default filter would keep only the
    first per line, and a step that syncs in a loop would count once."""
    import warnings

    with gc.caught_syncs(False) as found:
        for _ in range(3):
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("something else", stacklevel=1)
    assert len(found) == 3
    assert {gc._where(w.filename, w.lineno) for w in found} == {f"tests/test_gpu_check.py:{found[0].lineno}"}
