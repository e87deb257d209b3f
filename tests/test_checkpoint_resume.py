"""Resuming an interrupted run from its last epoch checkpoint (litgpt's test_full.py style): the resumed run trains
exactly the remaining steps and ends with the metrics of an uninterrupted run; the last, partial logging window and
the final training loss are recorded."""

from __future__ import annotations

import io
import json

import pytest
import torch
from conftest import smoke_config
from rich.console import Console

import clue_adv.train as train_module
from clue_adv.rundir import read_jsonl
from clue_adv.train import train

# Timing and process facts: the only fields a resumed run may differ in from an uninterrupted one.
NOT_COMPARED = {
    "started_at", "finished_at", "train_wall_time_s", "eval_wall_time_s", "mean_step_time_s", "samples_per_s",
    "peak_memory_mb",
    "resumed_after_epochs",
}  # fmt: skip
STEPS_PER_EPOCH = 6  # 96 examples, batch 16


def _config(**overrides):
    base = smoke_config()
    fields = {
        "data": {"path": base.data.path, "max_train_samples": 96, "max_eval_samples": 64},
        "batch_size": 16,
        "epochs": 3,
        "log_every_n_steps": 4,  # 18 steps: lines at 4, 8, 12, 16, and a window open across each epoch's end
        "checkpoint": {"every_epoch": True},
        "save_model": True,
    }
    return smoke_config(**(fields | overrides))


def _counting_steps(monkeypatch, interrupt_at: int | None = None) -> list[int]:
    """Count train_step calls; raise KeyboardInterrupt (Ctrl-C) at call `interrupt_at`."""
    calls: list[int] = []
    original = train_module.train_step

    def step(*args, **kwargs):
        calls.append(len(calls) + 1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", step)
    return calls


def _lines(directory):
    return [{k: v for k, v in r.items() if k != "step_time_s"} for r in read_jsonl(directory / "metrics.jsonl")]


@pytest.mark.parametrize(
    "overrides",
    [
        {},  # dropout draws from the global RNG; the sampler from its own generator
        {"strategy": {"name": "smart"}, "data__length_grouped": True},  # an EMA teacher and noise draws to restore
        {"optim": {"lr": 1e-3, "grad_accum_steps": 4}},  # 2 steps per epoch, the second a window of 2
    ],
    ids=["none", "smart-length-grouped", "accumulation"],
)
def test_an_interrupted_run_resumes_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch, overrides):
    cfg = _config(**overrides)
    steps_per_epoch = 2 if "optim" in overrides else STEPS_PER_EPOCH
    whole = train(cfg, tmp_path / "whole", show_progress=False)
    assert whole.summary["status"] == "completed" and whole.summary["steps"] == 3 * steps_per_epoch
    assert not (whole.directory / "checkpoint").exists()  # removed once the run completed

    calls = _counting_steps(monkeypatch, interrupt_at=steps_per_epoch + 2)  # in epoch 2
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", show_progress=False)
    directory = tmp_path / "cut" / whole.directory.relative_to(tmp_path / "whole")
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_step"] == steps_per_epoch + 1
    saved = directory / "checkpoint" / "epoch-1"
    assert sorted(p.name for p in saved.iterdir()) == ["loop.json", "model.safetensors", "state.pt"]
    torch.load(saved / "state.pt", weights_only=True)  # tensors and plain values only: nothing pickled runs

    monkeypatch.undo()
    calls = _counting_steps(monkeypatch)
    screen = io.StringIO()
    resumed = train(cfg, tmp_path / "cut", show_progress=False, console=Console(file=screen, width=300))
    assert "resuming after epoch 1" in screen.getvalue()
    assert len(calls) == 2 * steps_per_epoch  # exactly the remaining epochs, not the run again
    assert _lines(resumed.directory) == _lines(whole.directory)  # every train and eval line, the same numbers
    assert resumed.summary["resumed_after_epochs"] == [1]
    assert {k: v for k, v in resumed.summary.items() if k not in NOT_COMPARED} == {
        k: v for k, v in whole.summary.items() if k not in NOT_COMPARED
    }
    assert not (resumed.directory / "checkpoint").exists()
    model = "model/model.safetensors"  # the best epoch's weights
    assert (resumed.directory / model).read_bytes() == (whole.directory / model).read_bytes()


def test_force_or_a_damaged_checkpoint_starts_over(tmp_path, monkeypatch):
    cfg = _config(epochs=2)
    whole = train(cfg, tmp_path / "whole", show_progress=False)
    _counting_steps(monkeypatch, interrupt_at=STEPS_PER_EPOCH + 1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", show_progress=False)
    monkeypatch.undo()
    directory = tmp_path / "cut" / whole.directory.relative_to(tmp_path / "whole")
    (directory / "checkpoint" / "epoch-1" / "state.pt").write_bytes(b"not a checkpoint")

    calls = _counting_steps(monkeypatch)
    screen = io.StringIO()
    again = train(cfg, tmp_path / "cut", show_progress=False, console=Console(file=screen, width=300))
    assert "not resuming from epoch-1" in screen.getvalue() and "starting over" in screen.getvalue()
    assert len(calls) == 2 * STEPS_PER_EPOCH and "resumed_after_epochs" not in again.summary
    assert _lines(again.directory) == _lines(whole.directory)

    # --force: a checkpoint left by an interrupted run is not used
    monkeypatch.undo()
    _counting_steps(monkeypatch, interrupt_at=STEPS_PER_EPOCH + 1)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", force=True, show_progress=False)
    monkeypatch.undo()
    calls = _counting_steps(monkeypatch)
    train(cfg, tmp_path / "cut", force=True, show_progress=False)
    assert len(calls) == 2 * STEPS_PER_EPOCH


def test_a_run_without_checkpoints_starts_over_and_turning_them_on_is_the_same_run(tmp_path, monkeypatch):
    plain = _config(epochs=2, checkpoint={"every_epoch": False})
    _counting_steps(monkeypatch, interrupt_at=STEPS_PER_EPOCH + 1)
    with pytest.raises(KeyboardInterrupt):
        train(plain, tmp_path, show_progress=False)
    monkeypatch.undo()
    calls = _counting_steps(monkeypatch)
    outcome = train(_config(epochs=2), tmp_path, show_progress=False)  # checkpoint is not part of the identity
    assert len(calls) == 2 * STEPS_PER_EPOCH and outcome.summary["status"] == "completed"


def test_the_last_partial_logging_window_and_the_final_training_loss_are_recorded(tmp_path):
    """500 examples at batch 32: 15 batches of 32 and one of 20; a log line every 5 steps, and the 16th step's
    line although its window holds one step. The final training loss is the epoch's mean over its examples."""
    base = smoke_config()
    cfg = smoke_config(data={"path": base.data.path, "max_train_samples": 500, "max_eval_samples": 64})
    every_step = train(cfg.model_copy(update={"log_every_n_steps": 1}), tmp_path / "a", show_progress=False)
    losses = [r["loss"] for r in read_jsonl(every_step.directory / "metrics.jsonl") if r["type"] == "train"]
    sizes = [32] * 15 + [20]
    assert len(losses) == 16
    expected = sum(loss * n for loss, n in zip(losses, sizes, strict=True)) / 500
    assert every_step.summary["final_train_loss"] == pytest.approx(expected, rel=1e-12)

    sparse = train(cfg.model_copy(update={"log_every_n_steps": 5}), tmp_path / "b", show_progress=False)
    logged = [r for r in read_jsonl(sparse.directory / "metrics.jsonl") if r["type"] == "train"]
    assert [r["step"] for r in logged] == [5, 10, 15, 16]
    assert logged[-1]["loss"] == pytest.approx(losses[-1], rel=1e-12)  # the last window: step 16 alone
    assert logged[0]["loss"] == pytest.approx(sum(losses[:5]) / 5, rel=1e-12)
