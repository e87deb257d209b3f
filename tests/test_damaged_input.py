"""Damaged or hostile files and options (found by an adversarial hunt): each gets a named error and exit 2, or is
read around, never a traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_report import write_run
from typer.testing import CliRunner

from clue_adv.cli import app
from clue_adv.data import ASSETS

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "smoke.yaml"
runner = CliRunner()


def invoke(*args: object):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def test_deeply_nested_yaml_and_json_are_named_errors(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("x: " + "[" * 5000 + "]" * 5000 + "\n")
    result = invoke("validate", deep)
    assert result.exit_code == 2 and "nested too deeply" in result.output
    data = tmp_path / "data"
    shutil.copytree(ASSETS / "tnews", data)
    (data / "dev.json").write_text('{"sentence": ' + "[" * 5000 + "]" * 5000 + "}\n")
    result = invoke("validate", SMOKE, "--set", f"data.path={data}")
    assert result.exit_code == 2 and "dev.json:1: nested too deeply" in " ".join(result.output.split())


def test_a_lone_surrogate_escape_in_data_is_named_with_its_line(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(ASSETS / "tnews", data)
    lines = (data / "train.json").read_text(encoding="utf-8").split("\n")
    lines[2] = '{"label": "100", "sentence": "a\\ud800b"}'
    (data / "train.json").write_text("\n".join(lines), encoding="utf-8")
    result = invoke("validate", SMOKE, "--set", f"data.path={data}")
    assert result.exit_code == 2 and "train.json:3: a string holds a lone surrogate" in " ".join(result.output.split())


def test_train_and_dev_ids_of_any_type_do_not_matter(tmp_path):
    """ids are read only from unlabelled test files; in train/dev a mix of types used to break the Arrow table."""
    from clue_adv.data import read_labels, read_split

    data = tmp_path / "data"
    shutil.copytree(ASSETS / "tnews", data)
    lines = (data / "train.json").read_text(encoding="utf-8").split("\n")[:10]
    records = [json.loads(line) for line in lines]
    for i, record in enumerate(records):
        record["id"] = ["x3", 10**30, [1], {"a": 1}, None][i % 5]
    (data / "train.json").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    columns = read_split(data / "train.json", read_labels(data / "labels.json"))
    assert set(columns) == {"sentence", "label"} and len(columns["label"]) == 10


@pytest.mark.parametrize(
    ("line", "replacement", "needle"),
    [
        ("task: tnews\n", "task: [tnews]\n", "base task: ['tnews'] is not a task name"),
        ("experiment: smoke\n", "experiment: 5\n", None),  # a number names the experiment "5"
    ],
)
def test_a_sweep_base_with_odd_values_plans_or_is_a_config_error(tmp_path, line, replacement, needle):
    # the smoke config's paths are relative to configs/: absolute in the copy
    text = SMOKE.read_text().replace("../clue_adv/", f"{REPO}/clue_adv/")
    (tmp_path / "base.yaml").write_text(text.replace(line, replacement))
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"base: base.yaml\nseeds: 1\nstrategies: [{{name: none}}]\noutput_dir: {tmp_path / 'o'}\n")
    result = invoke("sweep", "-c", sweep, "--dry-run")
    if needle is None:
        assert result.exit_code == 0, result.output
    else:
        assert result.exit_code == 2 and needle in " ".join(result.output.split())


def test_absurd_jobs_and_a_nul_byte_are_refused(tmp_path):
    result = invoke("sweep", "-c", REPO / "sweeps" / "smoke.yaml", "-o", tmp_path, "--jobs", "100000000000")
    assert result.exit_code == 2 and "at most 256" in result.output
    result = invoke("validate", SMOKE, "--set", 'output_dir="/tmp/a\\0b"')
    assert result.exit_code == 2 and "NUL byte" in result.output


@pytest.mark.parametrize(
    "damage",
    [
        {"summary": [1, 2]},
        {"summary": {"status": "completed", "best_dev_accuracy": "0.5", "peak_memory_mb": "n/a"}},
        {"summary": {"status": "completed", "best_dev_accuracy": 10**400, "dev_history": "long"}},
        {"summary": {"status": "completed", "best_dev_accuracy": 0.5, "dev_history": [{}]}},
        {"config": "seed: abc\n"},
        {"config": "- 1\n"},
        {"config_bytes": b"\xff\xfe"},
        {"summary_bytes": b"\xff\xfe"},
    ],
)
def test_report_reads_around_a_damaged_run(tmp_path, damage):
    root = tmp_path / "r"
    for seed in (1, 2):
        write_run(root, "x", "tnews", {"name": "none"}, seed, 50 + seed)
    victim = write_run(root, "x", "tnews", {"name": "none"}, 3, 55)
    if "summary" in damage:
        (victim / "summary.json").write_text(json.dumps(damage["summary"]))
    if "config" in damage:
        (victim / "config.yaml").write_text(damage["config"])
    if "config_bytes" in damage:
        (victim / "config.yaml").write_bytes(damage["config_bytes"])
    if "summary_bytes" in damage:
        (victim / "summary.json").write_bytes(damage["summary_bytes"])
    result = invoke("report", root)
    assert result.exit_code == 0, result.output
    assert (root / "report.md").is_file() and (root / "summary.csv").is_file()
    if "config" in damage or "config_bytes" in damage:
        assert "skipped" in result.output and "seed-3" in result.output


def test_report_into_a_file_and_odd_predict_options_are_named_errors(tmp_path):
    root = tmp_path / "r"
    run = write_run(root, "x", "tnews", {"name": "none"}, 1, 50)
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    result = invoke("report", root, "--output", blocker)
    assert result.exit_code == 2 and "is a file" in result.output
    test_file = ASSETS / "iflytek" / "test.json"
    result = invoke("predict", run, "-t", test_file, "--output", tmp_path)
    assert result.exit_code == 2 and "must be a file path" in result.output
    result = invoke("predict", run, "-t", test_file, "--output", blocker / "x.json")
    assert result.exit_code == 2 and "must be a file path" in result.output
