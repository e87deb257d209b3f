"""Run-directory files: atomic writes keep the old file on failure, a cut JSONL line is dropped, and a symlink
planted in a run directory is never written through."""

from __future__ import annotations

import json
import os

import pytest

import clue_adv.rundir as rundir
from clue_adv.errors import ClueAdvError
from clue_adv.rundir import JsonlWriter, atomic_write_json, atomic_write_text, open_in_run_dir, read_jsonl


def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"status": "completed"})

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rundir.os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_json(path, {"status": "running"})
    monkeypatch.undo()
    assert json.loads(path.read_text()) == {"status": "completed"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # the temporary file is gone
    atomic_write_text(path, "new\n")
    assert path.read_text() == "new\n"


def test_read_jsonl_keeps_whole_lines_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\nnot json\n{"step": 3}\n{"step": 4, "lo', encoding="utf-8")
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}, {"step": 3}]  # bad line skipped, cut last line dropped
    assert read_jsonl(tmp_path / "absent.jsonl") == []


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="POSIX only")
def test_a_symlink_in_a_run_directory_is_not_written_through(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(ClueAdvError, match="symbolic link"):
        JsonlWriter(run / "metrics.jsonl")
    with pytest.raises(ClueAdvError, match="symbolic link"):
        open_in_run_dir(run / "metrics.jsonl", "w")
    assert victim.read_text() == "precious\n"
    # atomic writes replace the link itself
    (run / "summary.json").symlink_to(victim)
    atomic_write_json(run / "summary.json", {"status": "running"})
    assert victim.read_text() == "precious\n" and not (run / "summary.json").is_symlink()


def test_a_sweep_worker_log_planted_as_a_symlink_is_replaced_and_an_earlier_log_is_kept(tmp_path):
    """The parallel sweep opens each cell's train.log itself: a link there is removed, its target untouched; a
    log an earlier session left (a resumed run's) is appended to, after a session mark."""
    from test_sweep import write_sweep

    from clue_adv.sweep import load_plan, run_sweep
    from clue_adv.sweep.outcome import SESSION_MARK

    path = write_sweep(tmp_path, {"strategies": [{"name": "none"}], "seeds": 2})
    plan = load_plan(path)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    linked, earlier = plan.cells
    for cell in plan.cells:
        cell.directory.mkdir(parents=True)
    (linked.directory / "train.log").symlink_to(victim)
    (earlier.directory / "train.log").write_text("error: the first session's failure\n")
    result = run_sweep(plan, jobs=2, show_progress=False)
    assert result.exit_code == 0, [r.error for r in result.results]
    assert victim.read_text() == "precious\n"
    assert not (linked.directory / "train.log").is_symlink()
    assert (linked.directory / "train.log").read_text().startswith(SESSION_MARK)
    kept = (earlier.directory / "train.log").read_text().splitlines()
    assert kept[0] == "error: the first session's failure" and kept[1].startswith(SESSION_MARK) and len(kept) > 3


def test_output_dir_under_home_is_expanded(tmp_path, monkeypatch):
    from clue_adv.config import parse_config
    from clue_adv.rundir import run_dir

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = parse_config({"task": "tnews", "output_dir": "~/runs"})
    assert run_dir(cfg) == tmp_path / "runs" / "default" / "tnews" / "none" / "seed-1"


@pytest.mark.skipif(not hasattr(os, "O_NOFOLLOW"), reason="POSIX only")
def test_saving_the_model_never_writes_through_a_planted_symlink(tmp_path, tokenizer):
    from conftest import tiny_bert

    from clue_adv.train import _save_model

    outside = tmp_path / "outside"
    outside.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".model.tmp").symlink_to(outside, target_is_directory=True)
    _save_model(tiny_bert(), tokenizer, run)
    assert list(outside.iterdir()) == []
    assert (run / "model" / "config.json").is_file() and not (run / "model").is_symlink()
