"""`clue-adv validate`: schema, paths and data contents in one pass; sweep files cell by cell."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from clue_adv.cli import app
from clue_adv.data import ASSETS

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    # The shipped configs name data and tokenizer relative to the repository root.
    monkeypatch.chdir(REPO)


def invoke(*args: object):
    return runner.invoke(app, ["validate", *(str(a) for a in args)])


def run_yaml(tmp_path: Path, data_path: Path, extra: str = "") -> Path:
    f = tmp_path / "run.yaml"
    f.write_text(f"task: tnews\ndata: {{path: {data_path}}}\nmodel: {{name_or_path: {ASSETS / 'tokenizer'}}}\n" + extra)
    return f


def data_dir(tmp_path: Path, train: str | None = None, labels: str | None = None) -> Path:
    """A copy of the bundled TNEWS sample, with `train.json` or `labels.json` replaced when given."""
    root = tmp_path / "data"
    root.mkdir()
    for name in ("labels.json", "train.json", "dev.json"):
        shutil.copy(ASSETS / "tnews" / name, root / name)
    if train is not None:
        (root / "train.json").write_text(train, encoding="utf-8")
    if labels is not None:
        (root / "labels.json").write_text(labels, encoding="utf-8")
    return root


def test_bundled_config_is_valid():
    result = invoke(REPO / "configs" / "smoke.yaml")
    assert result.exit_code == 0, result.output


def test_schema_error_does_not_hide_a_missing_data_file(tmp_path):
    root = data_dir(tmp_path)
    (root / "dev.json").unlink()
    result = invoke(run_yaml(tmp_path, root, "batch_size: lots\n"))
    assert result.exit_code == 2, result.output
    assert "batch_size: Input should be a valid integer" in result.output
    assert f"data.dev_file: file not found: {root / 'dev.json'}" in result.output


def test_labels_json_with_the_wrong_count(tmp_path):
    lines = (ASSETS / "tnews" / "labels.json").read_text(encoding="utf-8").splitlines()
    root = data_dir(tmp_path, labels="\n".join(lines + [json.dumps({"label": "999", "label_desc": "x"})]) + "\n")
    result = invoke(run_yaml(tmp_path, root))
    assert result.exit_code == 2, result.output
    assert "tnews has 15 labels but" in result.output and "lists 16" in result.output


def test_malformed_json_line_names_file_and_line(tmp_path):
    root = data_dir(tmp_path, train='{"label": "100", "sentence": "a"}\n{"label": "100", "sent\n')
    result = invoke(run_yaml(tmp_path, root))
    assert result.exit_code == 2, result.output
    assert f"{root / 'train.json'}:2: not valid JSON" in result.output


def test_unknown_label_names_file_and_line(tmp_path):
    root = data_dir(tmp_path, train='{"label": "100", "sentence": "a"}\n{"label": "105", "sentence": "b"}\n')
    result = invoke(run_yaml(tmp_path, root))
    assert result.exit_code == 2, result.output
    assert f"{root / 'train.json'}:2: label '105' is not in labels.json" in result.output


def test_empty_split(tmp_path):
    root = data_dir(tmp_path, train="\n")
    result = invoke(run_yaml(tmp_path, root))
    assert result.exit_code == 2, result.output
    assert f"{root / 'train.json'}: no records (empty split)" in result.output


def test_smoke_sweep_is_valid():
    result = invoke(REPO / "sweeps" / "smoke.yaml")
    assert result.exit_code == 0, result.output


def test_sweep_with_one_bad_cell_names_the_cell(tmp_path):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(
        f"base: {REPO / 'configs' / 'smoke.yaml'}\nexperiment: v\nseeds: 2\noutput_dir: {tmp_path / 'out'}\n"
        "strategies: [{name: none}]\ngrid: {optim.lr: [1.0e-3, -1]}\n"
    )
    result = invoke(sweep)
    assert result.exit_code == 2, result.output
    assert "v+optim.lr=-1/tnews/none: optim.lr" in result.output
    assert "optim.lr=0.001" not in result.output  # the good cell is not blamed
    assert result.output.count("optim.lr: ") == 1  # two seeds, one message


def test_sweep_data_problems_are_reported_once(tmp_path):
    root = data_dir(tmp_path, train="\n")
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(
        f"base: {REPO / 'configs' / 'smoke.yaml'}\nexperiment: v\nseeds: 3\noutput_dir: {tmp_path / 'out'}\n"
        f"strategies: [{{name: none}}, {{name: gaussian_noise}}]\noverrides: {{data.path: {root}}}\n"
    )
    result = invoke(sweep)
    assert result.exit_code == 2, result.output
    assert result.output.count("no records (empty split)") == 1
