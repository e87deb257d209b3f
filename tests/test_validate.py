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
    """AutoConfig as the HF cache would answer: a config with `positions`, or (None) not cached. Online as far as
    validate knows (AutoConfig never reaches the network here): offline, a hub name also gets the offline warning."""
    import transformers

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
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
    assert "experiment: must be a plain name" in output
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


def test_paths_in_a_config_file_are_relative_to_it_and_paths_on_the_command_line_to_the_current_directory(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    # configs/smoke.yaml names ../clue_adv/assets/...: found from its own folder, whatever the current directory
    assert invoke(REPO / "configs" / "smoke.yaml").exit_code == 0
    result = invoke(REPO / "configs" / "smoke.yaml", "--set", "data.path=clue_adv/assets/tnews")
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert (
        f"data.path: directory not found: clue_adv/assets/tnews (relative to the current directory {tmp_path})" in text
    )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("seed=4294967296", "seed: Input should be less than or equal to 4294967295"),
        ("model.compile_backend=nosuch", "model.compile_backend: unknown torch.compile backend 'nosuch'"),
        ("data.path=~no-such-user-x/tnews", "data.path: '~no-such-user-x': no such user"),
        ("model.name_or_path=~no-such-user-x/m", "model.name_or_path: '~no-such-user-x': no such user"),
        ("output_dir=~no-such-user-x/out", "output_dir: '~no-such-user-x': no such user"),
        ("model.architecture.num_attention_heads=3", "hidden_size 128 is not a multiple of num_attention_heads 3"),
        ("strategy={name: vat, iterations: " + "9" * 250 + "}", "name the variant with strategy.tag"),
    ],
)
def test_values_train_would_crash_on_are_config_errors(setting, message):
    """Each of these passed validate before and then crashed `train` (a traceback, exit 1)."""
    result = invoke(REPO / "configs" / "smoke.yaml", "--set", setting)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_sweep_seed_beyond_the_seeding_range_is_a_config_error(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"base: {REPO / 'configs' / 'smoke.yaml'}\nseeds: [1, 4294967296]\nstrategies: [{{name: none}}]\n")
    result = invoke(sweep)
    assert result.exit_code == 2 and "seeds must be between 0 and 4294967295" in " ".join(result.output.split())


def test_a_local_model_directory_missing_its_files_is_reported_without_a_hub_hint(tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    result = invoke(REPO / "configs" / "smoke.yaml", "--set", f"model.name_or_path={empty}")
    text = " ".join(result.output.split())
    assert result.exit_code == 2
    assert f"model.name_or_path: {empty} has no config.json" in text
    assert f"model.name_or_path: {empty} has no tokenizer files" in text


def test_a_local_directory_that_does_not_load_gets_no_hub_advice(tmp_path):
    from clue_adv.config import ModelConfig
    from clue_adv.model import build_tokenizer

    broken = tmp_path / "tok"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(Exception) as info:
        build_tokenizer(ModelConfig(name_or_path=str(broken)))
    text = str(info.value)
    assert "model.name_or_path: could not load tokenizer from the directory" in text
    assert "Without the hub" not in text


def test_a_sweep_reports_every_stage_in_one_pass(tmp_path):
    """A schema error of the sweep file does not hide its strategy blocks' and override keys' problems, and a bad
    cell value does not hide a missing data directory or too long a max_length."""
    smoke = REPO / "configs" / "smoke.yaml"
    first = tmp_path / "s1.yaml"
    first.write_text(
        f"base: {smoke}\nseedz: 3\nstrategies: [{{name: fgmm}}, {{name: fgm, epsilon: -1}}]\n"
        "overrides: {optim.lrr: 1}\n"
    )
    text = " ".join(invoke(first).output.split())
    for needle in (
        "seedz: unknown field (did you mean 'seeds'?)",
        "overrides.optim.lrr: unknown field",
        "strategies.0.name: unknown strategy 'fgmm'",
        "strategies.1.epsilon: Input should be greater than or equal to 0",
    ):
        assert needle in text, (needle, text)
    second = tmp_path / "s2.yaml"
    second.write_text(f"base: {smoke}\nseeds: 1\noverrides: {{optim.lr: -1, data.path: /nope, max_length: 1000}}\n")
    result = invoke(second)
    text = " ".join(result.output.split())
    assert result.exit_code == 2
    for needle in (
        "optim.lr: Input should be greater than 0",
        "data.path: directory not found: /nope",
        "max_length: 1000 exceeds the model's 512 positions",
    ):
        assert needle in text, (needle, text)


def test_a_path_no_file_can_have_is_a_named_error_not_an_oserror(tmp_path):
    """A component over 255 bytes makes every stat() raise 'File name too long' (found by the sweep fuzzer)."""
    long = "x" * 300
    result = invoke(REPO / "configs" / "smoke.yaml", "--set", f"data.path=/tmp/{long}")
    assert result.exit_code == 2 and "data.path: a path component is longer than 255 bytes" in result.output
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"base: {long}.yaml\nstrategies: [{{name: none}}]\n")
    result = invoke(sweep)
    assert result.exit_code == 2 and "base: run config not found" in result.output, result.output
    result = invoke(tmp_path / f"{long}.yaml")
    assert result.exit_code == 2 and "longer than 255 bytes" in result.output
    assert runner.invoke(app, ["train", "-c", str(tmp_path / f"{long}.yaml")]).exit_code == 2


def test_long_names_in_every_path_argument_are_named_errors(tmp_path):
    long = "a" * 300
    smoke = REPO / "configs" / "smoke.yaml"
    for setting in (f"data.train_file={long}", f"data.dev_file={long}"):
        result = invoke(smoke, "--set", "data.path=clue_adv/assets/tnews", "--set", setting)
        assert result.exit_code == 2 and "longer than 255 bytes" in result.output, result.output
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"base: {smoke}\nseeds: 1\noverrides: {{data.train_file: {long}}}\n")
    assert "longer than 255 bytes" in invoke(sweep).output
    for args in (
        ["train", "-c", str(smoke), "-o", str(tmp_path / long)],
        ["report", str(tmp_path / long)],
        ["predict", str(tmp_path / long), "-t", str(tmp_path)],
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "longer than 255 bytes" in result.output, (args, result.output)
    # a config path whose bytes are not UTF-8 (a str with surrogates): not found, not a UnicodeEncodeError
    result = invoke(tmp_path / "\udcff.yaml")
    assert result.exit_code == 2 and "config file not found" in result.output


def test_a_home_relative_path_is_not_called_relative_to_the_current_directory():
    result = invoke(REPO / "configs" / "smoke.yaml", "--set", "model.name_or_path=~/no-such-model-dir")
    assert result.exit_code == 2
    assert "directory not found: ~/no-such-model-dir" in result.output and "relative to" not in result.output


def test_a_config_file_under_a_literal_tilde_folder_loads(tmp_path, monkeypatch):
    """Config paths come from the shell, already expanded: `~nouser/c.yaml` is a relative path there."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "~nouser").mkdir()
    shutil.copy(REPO / "configs" / "smoke.yaml", tmp_path / "~nouser" / "c.yaml")
    result = invoke(
        "~nouser/c.yaml",
        "--set",
        f"data.path={ASSETS / 'tnews'}",
        "--set",
        f"model.name_or_path={ASSETS / 'tokenizer'}",
    )
    assert result.exit_code == 0, result.output


def test_a_sweep_whose_base_fails_its_schema_gets_no_invented_problems(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("base: 5\nstrategies: [{name: none}]\n")
    text = invoke(sweep).output
    assert "base" in text and "names no task" not in text
