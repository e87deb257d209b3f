"""`clue-adv predict`: the submission file from a saved model agrees with the run's own dev evaluation."""

from __future__ import annotations

import json

import pytest
from conftest import smoke_config
from typer.testing import CliRunner

from clue_adv.cli import app
from clue_adv.data import ASSETS, read_labels
from clue_adv.errors import ClueAdvError
from clue_adv.predict import predict
from clue_adv.train import train

runner = CliRunner()
DEV_SAMPLES = 64


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """A finished tiny run with the study head (no pooler weights saved) and its best model."""
    cfg = smoke_config(
        data={"path": str(ASSETS / "tnews"), "max_train_samples": 128, "max_eval_samples": DEV_SAMPLES},
        model__head="cls",
        model__architecture__hidden_size=32,
        model__architecture__intermediate_size=64,
        epochs=2,
        save_model=True,
    )
    return train(cfg, tmp_path_factory.mktemp("predict"), show_progress=False)


def test_predictions_reproduce_the_runs_dev_accuracy(saved_run, tmp_path):
    # Dev records as an unlabelled "test" file: the ids are ours, the labels are kept aside.
    dev_lines = (ASSETS / "tnews" / "dev.json").read_text(encoding="utf-8").splitlines()[:DEV_SAMPLES]
    gold, test_lines = [], []
    for i, line in enumerate(dev_lines):
        record = json.loads(line)
        gold.append(record.pop("label"))
        record.pop("label_desc", None)
        test_lines.append(json.dumps({"id": 1000 + i, **record}, ensure_ascii=False))
    test_file = tmp_path / "test.json"
    test_file.write_text("\n".join(test_lines) + "\n", encoding="utf-8")

    result = predict(saved_run.directory, test_file)
    assert result.path == saved_run.directory / "tnews_predict.json"
    lines = result.path.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["id"] for r in records] == list(range(1000, 1000 + DEV_SAMPLES))  # test-file order, its ids
    assert all(set(r) == {"id", "label"} and isinstance(r["label"], str) for r in records)
    assert {r["label"] for r in records} <= set(read_labels(ASSETS / "tnews" / "labels.json").ids)
    # The saved model is the best-dev one: its accuracy on these records is the run's best dev accuracy.
    accuracy = sum(r["label"] == g for r, g in zip(records, gold, strict=True)) / len(gold)
    assert accuracy == pytest.approx(saved_run.summary["best_dev_accuracy"], abs=1e-12)


def test_cli_predict_on_the_bundled_iflytek_test_file_format(saved_run, tmp_path):
    # The bundled IFLYTEK test file (real CLUE ids, unlabelled, long texts) through a TNEWS model: format and
    # order only. The file is recognisably IFLYTEK's (no record has TNEWS's keywords), which predict warns about.
    out = tmp_path / "submission.json"
    result = runner.invoke(
        app,
        [
            "predict",
            str(saved_run.directory),
            "--test-file",
            str(ASSETS / "iflytek" / "test.json"),
            "--output",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "look like iflytek test data" in " ".join(result.output.split()), result.output
    ids = [json.loads(line)["id"] for line in (ASSETS / "iflytek" / "test.json").open(encoding="utf-8", newline="\n")]
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    assert [r["id"] for r in got] == ids and len(got) == 200


def test_a_run_without_a_saved_model_is_a_clear_error(tmp_path):
    run = train(smoke_config(data__max_train_samples=32, data__max_eval_samples=32), tmp_path, show_progress=False)
    with pytest.raises(ClueAdvError, match="save_model"):
        predict(run.directory, ASSETS / "iflytek" / "test.json")
    result = runner.invoke(app, ["predict", str(tmp_path), "--test-file", str(ASSETS / "iflytek" / "test.json")])
    assert result.exit_code == 2 and "not a run directory" in result.output


def test_only_a_completed_run_predicts_unless_allowed(saved_run, tmp_path):
    """An interrupted run's saved model is its best before it stopped: refused, unless --allow-incomplete."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(saved_run.directory, run)
    (run / "tnews_predict.json").unlink(missing_ok=True)  # an earlier test's submission
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    test_file = ASSETS / "tnews" / "dev.json"
    result = runner.invoke(app, ["predict", str(run), "--test-file", str(test_file)])
    assert result.exit_code == 2 and "'interrupted'" in result.output and "--allow-incomplete" in result.output
    assert not (run / "tnews_predict.json").exists()
    result = runner.invoke(app, ["predict", str(run), "--test-file", str(test_file), "--allow-incomplete"])
    assert result.exit_code == 0, result.output
    assert (run / "tnews_predict.json").is_file() and "warning" not in result.output


def test_a_submission_named_for_the_other_task_is_refused(saved_run, tmp_path):
    out = tmp_path / "iflytek_predict.json"
    result = runner.invoke(
        app, ["predict", str(saved_run.directory), "-t", str(ASSETS / "tnews" / "dev.json"), "--output", str(out)]
    )
    assert result.exit_code == 2 and "tnews_predict.json" in result.output and not out.exists()


def test_a_pickled_checkpoint_is_never_loaded(saved_run, tmp_path):
    """Only safetensors weights are read: a run whose model is a pickled .bin is refused, not unpickled."""
    import shutil

    import torch
    from safetensors.torch import load_file

    run = tmp_path / "run"
    shutil.copytree(saved_run.directory, run)
    for weights in (run / "model").glob("*.safetensors"):
        torch.save(load_file(weights), run / "model" / "pytorch_model.bin")
        weights.unlink()
    with pytest.raises(ClueAdvError, match="pickled"):
        predict(run, ASSETS / "tnews" / "dev.json")


def test_predict_on_an_iflytek_run_maps_classes_back_to_the_119_label_strings(tmp_path):
    labels = list(read_labels(ASSETS / "iflytek" / "labels.json").ids)
    assert len(labels) == 119
    cfg = smoke_config(
        task="iflytek",
        data={"path": str(ASSETS / "iflytek"), "max_train_samples": 64, "max_eval_samples": DEV_SAMPLES},
        save_model=True,
    )
    run = train(cfg, tmp_path / "runs", show_progress=False)
    # Dev records as an unlabelled test file (IFLYTEK's "sentence" texts hold U+2028: split on "\n" only).
    dev_lines = (ASSETS / "iflytek" / "dev.json").read_text(encoding="utf-8").split("\n")[:DEV_SAMPLES]
    gold, test_lines = [], []
    for i, line in enumerate(dev_lines):
        record = json.loads(line)
        gold.append(record.pop("label"))
        record.pop("label_des", None)
        test_lines.append(json.dumps({"id": i, **record}, ensure_ascii=False))
    test_file = tmp_path / "test.json"
    test_file.write_text("\n".join(test_lines) + "\n", encoding="utf-8")

    result = runner.invoke(app, ["predict", str(run.directory), "--test-file", str(test_file)])
    assert result.exit_code == 0, result.output
    out = run.directory / "iflytek_predict.json"
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n") if line]
    assert [r["id"] for r in records] == list(range(DEV_SAMPLES))
    assert all(isinstance(r["label"], str) and r["label"] in labels for r in records)
    # The saved model's classes are labels.json's 119 strings in order, and predictions scored against the
    # gold strings give the run's own best dev accuracy: no class is mapped to the wrong name.
    model_config = json.loads((run.directory / "model" / "config.json").read_text(encoding="utf-8"))
    assert [model_config["id2label"][str(i)] for i in range(119)] == labels
    accuracy = sum(r["label"] == g for r, g in zip(records, gold, strict=True)) / len(gold)
    assert accuracy == pytest.approx(run.summary["best_dev_accuracy"], abs=1e-12)
