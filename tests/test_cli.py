"""The command line: one clear message and exit code 2 for bad input, never a traceback."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table
from typer.testing import CliRunner

from clue_adv.cli import app
from clue_adv.cli_output import print_whole
from clue_adv.data import ASSETS

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def tiny_yaml(tmp_path: Path, extra: str = "", data_path: Path | str = ASSETS / "tnews") -> Path:
    f = tmp_path / "run.yaml"
    f.write_text(
        "experiment: cli\ntask: tnews\n"
        f"data: {{path: {data_path}, max_train_samples: 128, max_eval_samples: 64}}\n"
        f"model: {{name_or_path: {ASSETS / 'tokenizer'}, init: random, architecture: "
        "{num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}}\n"
        "max_length: 32\nepochs: 1\noptim: {lr: 1.0e-3}\n" + extra
    )
    return f


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_train_with_overrides_prints_a_table_and_writes_the_run(tmp_path):
    cfg = tiny_yaml(tmp_path)
    result = invoke("train", "--config", cfg, "--set", "seed=2", "--set", "optim.lr=2e-3", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "best dev acc" in result.output
    run = tmp_path / "out" / "cli+optim.lr=2e-3" / "tnews" / "none" / "seed-2"  # a --set variant: its own folder
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    # diagnostics are on by default, and what they cost is shown beside the training time
    assert f"diagnostics: {summary['diagnostics_wall_time_s']:.1f}s" in result.output
    assert "lr: 0.002" in (run / "config.yaml").read_text()
    again = invoke("train", "--config", cfg, "--set", "seed=2", "--set", "optim.lr=2e-3", "-o", tmp_path / "out")
    assert again.exit_code == 0 and "already completed" in again.output


@pytest.mark.parametrize(
    "extra,needle",
    [
        ("optimm: {}\n", "optimm: unknown field (did you mean 'optim'?)"),
        ("batch_size: lots\n", "batch_size: Input should be a valid integer"),
        ("strategy: {name: fgm, epsilon: -1}\n", "strategy.epsilon: Input should be greater than or equal to 0"),
        ("strategy: {name: adversarial}\n", "unknown strategy 'adversarial'"),
    ],
)
def test_bad_config_exits_2_naming_the_field(tmp_path, extra, needle):
    result = invoke("train", "--config", tiny_yaml(tmp_path, extra), "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()  # validation happens before anything is written


def test_missing_config_file_exits_2(tmp_path):
    result = invoke("train", "--config", tmp_path / "nope.yaml")
    assert result.exit_code == 2 and "config file not found" in result.output
    assert "Traceback" not in result.output


def test_missing_data_directory_exits_2(tmp_path):
    result = invoke("train", "--config", tiny_yaml(tmp_path, data_path=tmp_path / "nodata"), "-o", tmp_path / "o")
    assert result.exit_code == 2 and f"directory not found: {tmp_path / 'nodata'}" in result.output
    assert not (tmp_path / "o").exists()


def test_unknown_label_exits_2_with_file_and_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "labels.json").write_text((ASSETS / "tnews" / "labels.json").read_text(encoding="utf-8"))
    lines = (ASSETS / "tnews" / "train.json").read_text(encoding="utf-8").split("\n")[:20]
    lines[6] = json.dumps({"label": "111", "sentence": "没有这个标签"}, ensure_ascii=False)
    (data / "train.json").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (data / "dev.json").write_text("\n".join(lines[:5]) + "\n", encoding="utf-8")
    result = invoke("train", "--config", tiny_yaml(tmp_path, data_path=data), "-o", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert f"{data / 'train.json'}:7: label '111' is not in labels.json" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_validate_reports_every_problem_of_every_file(tmp_path):
    good = REPO / "configs" / "smoke.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: tnewz\nseed: -1\noptim: {lr: 0, warmup: 0.1}\n")
    result = invoke("validate", good, bad)
    assert result.exit_code == 2
    for needle in ("task:", "seed:", "optim.lr:", "optim.warmup: unknown field (did you mean 'warmup_ratio'?)"):
        assert needle in result.output, result.output
    assert invoke("validate", good).exit_code == 0


def test_strategies_lists_names_costs_and_parameters():
    result = invoke("strategies", "--json")
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.output)}
    assert rows["none"]["forward"] == 1 and rows["fgm"]["backward"] == 2
    assert rows["fgm"]["parameters"]["epsilon"]["default"] == 0.5
    assert all(p["description"] for r in rows.values() for p in r["parameters"].values())
    assert invoke("strategies", "fgm").exit_code == 0
    assert invoke("strategies", "nope").exit_code == 2


def test_strategies_list_reads_in_a_pipe_at_80_columns():
    """`clue-adv strategies | grep NAME` must find the row: in a pipe rich draws 80 columns, and a wrapped name
    (`gaussian_no` / `ise`) or a one-character parameter column made the list unreadable and ungreppable."""
    import os
    import re
    import subprocess
    import sys
    import unicodedata

    from clue_adv.regularizers import registry

    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    listing = subprocess.run(
        [sys.executable, "-m", "clue_adv", "strategies"], capture_output=True, text=True, env=env, timeout=120
    )
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    columns = [sum(not unicodedata.combining(c) for c in line.rstrip()) for line in lines]  # d̂: two code points
    assert max(columns) <= 80, listing.stdout
    for name in registry():  # as `grep -w NAME` would find it
        assert any(re.search(rf"(?<!\w){name}(?!\w)", line) for line in lines), f"{name}:\n{listing.stdout}"


def test_strategies_costs_a_variant_given_with_set():
    """The finite-difference gradient penalty's selling point is no double backward: the cost must show it."""
    exact = json.loads(invoke("strategies", "gradient_penalty", "--json").output)[0]
    assert (exact["forward"], exact["backward"], exact["double_backward"]) == (1, 2, True)
    fd = json.loads(invoke("strategies", "gradient_penalty", "--set", "mode=finite_difference", "--json").output)[0]
    assert (fd["forward"], fd["backward"], fd["double_backward"]) == (2, 2, False)
    assert fd["parameters"]["mode"] == {**exact["parameters"]["mode"], "value": "finite_difference"}
    pgd = json.loads(invoke("strategies", "pgd", "-s", "strategy.steps=5", "-s", "random_start=true", "--json").output)
    assert (pgd[0]["forward"], pgd[0]["backward"]) == (7, 7)
    text = invoke("strategies", "pgd", "--set", "steps=5").output
    assert "value" in text and "6 forward, 6 backward" in text
    bad = invoke("strategies", "pgd", "--set", "stepz=5")
    assert bad.exit_code == 2 and "strategy.stepz: unknown field (did you mean 'steps'?)" in bad.output
    assert invoke("strategies", "--set", "steps=5").exit_code == 2


def test_console_script_bad_config_exits_2_without_traceback(tmp_path):
    # CliRunner catches exceptions itself: only a real process shows whether a traceback would reach the user.
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "clue_adv", "train", "--config", str(tiny_yaml(tmp_path, "batch_size: lots\n"))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "batch_size: Input should be a valid integer" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc (root ignores permission bits)")
def test_an_output_folder_that_cannot_be_created_fails_before_setup(tmp_path, monkeypatch):
    import clue_adv.train as train_module

    def no_setup(*args, **kwargs):
        raise AssertionError("setup ran although the output folder cannot be written")

    monkeypatch.setattr(train_module, "build_tokenizer", no_setup)
    result = invoke("train", "--config", tiny_yaml(tmp_path), "-o", "/proc/clue-adv-test")
    assert result.exit_code == 2, result.output
    assert "cannot write to output folder /proc/clue-adv-test/" in " ".join(result.output.split())


def test_strategies_set_cannot_change_the_strategy_name():
    result = invoke("strategies", "pgd", "--set", "name=fgm")
    assert result.exit_code == 2 and "give the strategy as NAME" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_data_read_from_another_folder_is_the_same_run(tmp_path):
    """README's `--set data.path=...` says where the CLUE files are, not what is computed: no variant folder, and the
    same run read from a copy of the data elsewhere is already completed."""
    copy = tmp_path / "copy"
    shutil.copytree(ASSETS / "tnews", copy)
    cfg = tiny_yaml(tmp_path)
    first = invoke("train", "--config", cfg, "--set", f"data.path={copy}", "-o", tmp_path / "out")
    assert first.exit_code == 0, first.output
    assert (tmp_path / "out" / "cli" / "tnews" / "none" / "seed-1" / "summary.json").is_file()
    again = invoke("train", "--config", cfg, "-o", tmp_path / "out")
    assert again.exit_code == 0 and "already completed" in again.output, again.output


def test_a_table_printed_whole_leaves_the_console_following_the_terminal():
    """print_whole draws a table wider than the terminal; the console then follows COLUMNS again (it used to keep
    that width, so a later command's table in the same process, a test's, wrapped at it)."""
    environ: dict[str, str] = {}
    console = Console(file=io.StringIO(), _environ=environ)  # as cli's: its width read from COLUMNS at each print
    environ["COLUMNS"] = "60"
    table = Table()
    table.add_column("value", no_wrap=True)
    table.add_row("x" * 100)
    print_whole(console, table)
    assert "x" * 100 in console.file.getvalue()  # whole, on one line, wider than 60
    environ["COLUMNS"] = "200"
    assert console.width == 200
