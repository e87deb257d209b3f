"""data.holdout_size / holdout_seed / eval_split: a seeded part of the training file that is never trained on."""

from __future__ import annotations

import pytest
from conftest import smoke_config
from typer.testing import CliRunner

from clue_adv.cli import app
from clue_adv.data import ASSETS, holdout_indices, load_task_data, read_split
from clue_adv.errors import ConfigError, DataError

TRAIN_ROWS = 4000  # the bundled TNEWS sample's train.json


def test_holdout_indices_partition_the_rows_in_file_order():
    kept, held = holdout_indices(100, 30, seed=7)
    assert len(held) == 30 and len(kept) == 70
    assert sorted(kept + held) == list(range(100))
    assert kept == sorted(kept) and held == sorted(held)
    assert holdout_indices(100, 30, seed=7) == (kept, held)
    assert holdout_indices(100, 30, seed=8)[1] != held
    # a random draw, not a block of the file
    assert held[0] < 50 < held[-1]


def test_holdout_must_leave_training_examples():
    with pytest.raises(DataError, match="holdout_size: 10 leaves no training examples"):
        holdout_indices(10, 10, seed=0)


def test_holdout_is_never_trained_on_and_is_what_is_evaluated(tokenizer):
    cfg = smoke_config(data__max_train_samples=None, data__holdout_size=300, data__eval_split="holdout")
    data = load_task_data(cfg, tokenizer)
    assert len(data.train) == TRAIN_ROWS - 300
    assert len(data.dev) == 256  # max_eval_samples cuts the evaluated split
    # Independent of the code under test: the held rows are the training file's rows at the drawn indices.
    sentences = read_split(ASSETS / "tnews" / "train.json", None)["sentence"]
    _, held = holdout_indices(TRAIN_ROWS, 300, seed=0)
    expected = tokenizer([sentences[i] for i in held[:256]], truncation=True, max_length=cfg.max_length)["input_ids"]
    assert [list(x) for x in data.dev["input_ids"]] == expected
    held_set = set(held)
    kept_texts = [sentences[i] for i in range(TRAIN_ROWS) if i not in held_set]
    trained = tokenizer(kept_texts, truncation=True, max_length=cfg.max_length)["input_ids"]
    assert [list(x) for x in data.train["input_ids"]] == trained


def test_eval_split_dev_keeps_dev_and_max_train_samples_cuts_after_the_carve(tokenizer):
    plain = load_task_data(smoke_config(), tokenizer)
    carved = load_task_data(smoke_config(data__holdout_size=300), tokenizer)
    assert carved.dev["input_ids"] == plain.dev["input_ids"]
    assert len(carved.train) == 512
    sentences = read_split(ASSETS / "tnews" / "train.json", None)["sentence"]
    kept, _ = holdout_indices(TRAIN_ROWS, 300, seed=0)
    expected = tokenizer([sentences[i] for i in kept[:512]], truncation=True, max_length=48)["input_ids"]
    assert [list(x) for x in carved.train["input_ids"]] == expected


def test_the_run_seed_does_not_move_the_holdout(tokenizer):
    a = load_task_data(smoke_config(seed=1, data__holdout_size=300, data__eval_split="holdout"), tokenizer)
    b = load_task_data(smoke_config(seed=2, data__holdout_size=300, data__eval_split="holdout"), tokenizer)
    c = load_task_data(
        smoke_config(seed=1, data__holdout_size=300, data__eval_split="holdout", data__holdout_seed=5), tokenizer
    )
    assert a.dev["input_ids"] == b.dev["input_ids"] != c.dev["input_ids"]


def test_evaluating_on_a_holdout_needs_one():
    with pytest.raises(ConfigError, match="eval_split: 'holdout' needs data.holdout_size > 0"):
        smoke_config(data__eval_split="holdout")


def test_validate_names_a_holdout_as_large_as_the_training_file(tmp_path, monkeypatch):
    f = tmp_path / "run.yaml"
    f.write_text(
        f"task: tnews\ndata: {{path: {ASSETS / 'tnews'}, holdout_size: {TRAIN_ROWS}}}\n"
        f"model: {{name_or_path: {ASSETS / 'tokenizer'}, init: random}}\n"
    )
    result = CliRunner().invoke(app, ["validate", str(f)])
    assert result.exit_code == 2, result.output
    assert f"holdout_size: {TRAIN_ROWS} leaves no training examples (the training split has {TRAIN_ROWS})" in (
        result.output
    )


def test_a_sweep_checks_each_holdout_size_against_the_training_file(tmp_path):
    """Cells that differ only in data.holdout_size read the same files, but only one of them asks too much."""
    base = tmp_path / "run.yaml"
    base.write_text(
        f"task: tnews\ndata: {{path: {ASSETS / 'tnews'}}}\n"
        f"model: {{name_or_path: {ASSETS / 'tokenizer'}, init: random}}\n"
    )
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(
        "base: run.yaml\nexperiment: h\nseeds: 1\nstrategies: [{name: none}]\n"
        f"grid: {{data.holdout_size: [100, {TRAIN_ROWS}]}}\n"
    )
    result = CliRunner().invoke(app, ["sweep", "-c", str(sweep), "--dry-run", "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert f"holdout_size: {TRAIN_ROWS} leaves no training examples" in result.output
