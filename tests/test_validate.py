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


def hub_yaml(tmp_path: Path, max_length: int) -> Path:
    f = tmp_path / "hub.yaml"
    f.write_text(
        f"task: tnews\ndata: {{path: {ASSETS / 'tnews'}}}\nmodel: {{name_or_path: bert-base-chinese}}\n"
        f"max_length: {max_length}\n"
    )
    return f


def fake_hub_config(monkeypatch: pytest.MonkeyPatch, positions: int | None) -> list[dict]:
    """AutoConfig as the HF cache would answer: a config with `positions`, or (None) not cached."""
    import transformers
    from transformers import BertConfig

    calls: list[dict] = []

    def from_pretrained(name, **kwargs):
        calls.append({"name": name, **kwargs})
        if positions is None:
            raise OSError(f"{name} is not in the cache and outgoing traffic has been disabled")
        return BertConfig(max_position_embeddings=positions)

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", from_pretrained)
    return calls


def test_hub_model_max_length_is_checked_from_the_cache(tmp_path, monkeypatch):
    from clue_adv.validate import validate_file

    calls = fake_hub_config(monkeypatch, positions=512)
    notes: list[str] = []
    problems = validate_file(hub_yaml(tmp_path, 1024), notes=notes)
    assert "max_length: 1024 exceeds the model's 512 positions (bert-base-chinese)" in problems
    assert notes == [] and calls and all(c["local_files_only"] is True for c in calls)  # never the network
    assert validate_file(hub_yaml(tmp_path, 512), notes=notes) == [] and notes == []


def test_hub_model_not_in_the_cache_gets_a_note_not_an_error(tmp_path, monkeypatch):
    from clue_adv.validate import validate_file

    fake_hub_config(monkeypatch, positions=None)
    notes: list[str] = []
    assert validate_file(hub_yaml(tmp_path, 1024), notes=notes) == []
    assert notes == ["max_length not checked: bert-base-chinese's config is not in the local Hugging Face cache"]
    result = invoke(hub_yaml(tmp_path, 1024))
    assert result.exit_code == 0 and "note: max_length not checked" in result.output  # shown, not an error


def test_sweep_with_a_bad_schema_still_names_a_missing_base(tmp_path):
    sweep = tmp_path / "bad.yaml"
    sweep.write_text("base: nowhere.yaml\nexperiment: ../up\nseeds: lots\nstrategies: [{name: none}]\n")
    result = invoke(sweep)
    assert result.exit_code == 2, result.output
    output = " ".join(result.output.split())
    assert "seeds" in output
    assert f"base: run config not found: {tmp_path / 'nowhere.yaml'}" in output
    assert "experiment: Value error" in output
    assert output.count("run config not found") == 1


def test_a_task_of_the_wrong_type_is_a_problem_not_a_crash(tmp_path):
    f = run_yaml(tmp_path, ASSETS / "tnews")
    f.write_text(f.read_text().replace("task: tnews", "task: [1]"))
    result = invoke(f)
    assert result.exit_code == 2, result.output
    assert "task" in result.output and result.exception is None or isinstance(result.exception, SystemExit)


def test_a_pretrained_local_model_without_safetensors_weights_is_reported(tmp_path):
    """Training refuses it after minutes of tokenizing; validate says so at once (a random init needs no weights)."""
    model = tmp_path / "model"
    shutil.copytree(ASSETS / "tokenizer", model)
    (model / "pytorch_model.bin").write_bytes(b"not loaded")
    cfg = run_yaml(tmp_path, ASSETS / "tnews", f"model: {{name_or_path: {model}, init: pretrained}}\n")
    result = invoke(cfg)
    assert result.exit_code == 2
    assert "safetensors weights (model.safetensors) are required, it holds only pytorch_model.bin" in " ".join(
        result.output.split()
    )
    assert invoke(cfg, "--set", "model.init=random").exit_code == 0


def test_a_relative_path_that_is_missing_names_the_directory_it_was_resolved_from(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the shipped configs name paths relative to the repository root
    result = invoke(REPO / "configs" / "smoke.yaml")
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert (
        f"data.path: directory not found: clue_adv/assets/tnews (relative to the current directory {tmp_path})" in text
    )
