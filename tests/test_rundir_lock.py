"""The per-run-directory flock: a second process cannot train into a run directory another process holds."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import smoke_config
from typer.testing import CliRunner

from clue_adv.cli import app
from clue_adv.errors import ClueAdvError
from clue_adv.rundir import LOCK_NAME, release_run_lock, run_dir, run_lock_held, start_run

pytest.importorskip("fcntl")
runner = CliRunner()

# Another process takes the run's lock through the project's own API and waits until told to stop.
HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from clue_adv.rundir import acquire_run_lock
    acquire_run_lock(Path(sys.argv[1]))
    print("locked", flush=True)
    sys.stdin.read()
    """
)


class Holder:
    """A subprocess holding `directory`'s lock while the `with` block runs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __enter__(self) -> subprocess.Popen:
        self.directory.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-c", HOLDER, str(self.directory)]
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"
        return self.proc

    def __exit__(self, *exc: object) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def test_a_second_process_cannot_start_a_run_in_a_held_directory(tmp_path):
    cfg = smoke_config()
    directory = run_dir(cfg, tmp_path)
    with Holder(directory):
        assert run_lock_held(directory)
        with pytest.raises(ClueAdvError, match="another process holds its lock") as info:
            start_run(cfg, directory)
        assert str(directory.resolve()) in str(info.value)
        assert not (directory / "config.yaml").exists()  # refused before anything of the run was touched
    # The holder is gone (its lock went with it): the run can start, and holds the lock itself until released.
    assert not run_lock_held(directory)
    start_run(cfg, directory)
    try:
        assert (directory / "config.yaml").is_file() and (directory / LOCK_NAME).is_file()
        assert run_lock_held(directory)
        start_run(cfg, directory)  # a rerun in the same process (--force, in-process sweep) reuses its lock
    finally:
        release_run_lock(directory)
    assert not run_lock_held(directory)


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    cfg = smoke_config()
    directory = run_dir(cfg, tmp_path)
    with Holder(directory) as proc:
        proc.kill()
        proc.wait(timeout=30)
        start_run(cfg, directory)
        release_run_lock(directory)


def test_cli_train_into_a_held_directory_exits_2_naming_it(tmp_path):
    cfg = smoke_config(data__max_train_samples=32, data__max_eval_samples=32)
    config = tmp_path / "c.yaml"
    config.write_text(cfg.model_dump_json(), encoding="utf-8")  # JSON is YAML
    directory = run_dir(cfg, tmp_path / "out")
    with Holder(directory):
        result = runner.invoke(app, ["train", "-c", str(config), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    text = " ".join(result.output.split())  # rich may wrap the long path
    assert "another process holds its lock" in text and "seed-" in text
