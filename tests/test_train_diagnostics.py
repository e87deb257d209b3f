"""The diagnostics inside a training run (clue_adv/run_diagnostics.py, docs/DIAGNOSTICS.md): they change nothing in
training, a run without them records none and measures nothing, the best and the final model are measured on their
own weights (also across a resume), runs with the same seed are measured on the same examples and probes, and their
wall time is counted apart from training's."""

from __future__ import annotations

import time

import pytest
import torch
from conftest import REPO, smoke_config
from safetensors.torch import load_model

import clue_adv.run_diagnostics as run_diagnostics_module
import clue_adv.train as train_module
from clue_adv.data import load_task_data
from clue_adv.diagnostics import DiagnosticsResult, diagnose, diagnostic_batches
from clue_adv.model import build_model, build_tokenizer
from clue_adv.rundir import read_jsonl
from clue_adv.train import train

STEPS_PER_EPOCH = 4  # 64 examples, batch 16
# Small enough to cost a fraction of a second, yet every kind of measurement: curvature, both attacks, the gap.
SMALL = {"examples": 16, "batch_size": 8, "probes": 2, "epsilons": [0.1], "pgd_steps": 2}
TIMING = {"step_time_s", "diag/wall_time_s"}


def _config(**overrides):
    fields = {
        "data": {"path": smoke_config().data.path, "max_train_samples": 64, "max_eval_samples": 48},
        "batch_size": 16,
        "epochs": 2,
        "log_every_n_steps": 2,
    }
    return smoke_config(**(fields | overrides))


def _lines(directory, kind: str | None = None) -> list[dict]:
    records = read_jsonl(directory / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records if kind is None or r["type"] == kind]


def _untimed(results: dict) -> dict:
    return {name: {k: v for k, v in values.items() if k not in TIMING} for name, values in results.items()}


def _scripted_accuracies(monkeypatch, accuracies):
    """Dev evaluation replaced by a scripted accuracy sequence: which evaluation is the best is then chosen by the
    test (evaluation draws nothing random, so training is the same whatever the script)."""
    script = iter(accuracies)
    monkeypatch.setattr(
        train_module,
        "evaluate",
        lambda *a, **k: {"accuracy": next(script), "macro_f1": 0.0, "loss": 1.0, "examples": 48},
    )


def _counting_diagnose(monkeypatch) -> list[dict]:
    """Spy on diagnose: the seed and the token ids of the subsets of each call."""
    calls: list[dict] = []

    def spy(model, dev_batches, train_batches, config, *, seed):
        calls.append(
            {
                "seed": seed,
                "dev": [b["input_ids"].tolist() for b in dev_batches],
                "train": [b["input_ids"].tolist() for b in train_batches],
            }
        )
        return diagnose(model, dev_batches, train_batches, config, seed=seed)

    monkeypatch.setattr(run_diagnostics_module, "diagnose", spy)
    return calls


@pytest.mark.parametrize("when", ["every_eval", "end"])
def test_diagnostics_do_not_change_training(tmp_path, when):
    """Same seed with and without diagnostics: the same training loss at every logged step and the same dev
    metrics at every evaluation. Mid-epoch evaluations and dropout make `every_eval` the strongest case: any
    draw from the global random stream, any parameter or .grad left changed, would show in the next steps."""
    off = train(_config(eval={"every_n_steps": 3}), tmp_path / "off", show_progress=False)
    on = train(
        _config(eval={"every_n_steps": 3}, diagnostics={**SMALL, "when": when}), tmp_path / "on", show_progress=False
    )
    diag_lines = _lines(on.directory, "diagnostics")
    evaluations = _lines(on.directory, "eval")
    assert len(evaluations) == 4  # steps 3, 4 (epoch end), 6, 8
    if when == "every_eval":
        assert [(d["model"], d["step"]) for d in diag_lines] == [("eval", e["step"]) for e in evaluations]
    else:
        assert [d["model"] for d in diag_lines] == ["best", "final"]
    assert [r for r in _lines(on.directory) if r["type"] != "diagnostics"] == _lines(off.directory)
    assert on.summary["final_train_loss"] == off.summary["final_train_loss"]


def test_with_diagnostics_off_nothing_is_measured_or_recorded(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("diagnostics ran although diagnostics.enabled is false")

    monkeypatch.setattr(run_diagnostics_module, "diagnose", refuse)
    monkeypatch.setattr(run_diagnostics_module, "diagnostic_batches", refuse)
    cfg = _config(diagnostics={"enabled": False, "when": "every_eval"}, checkpoint={"every_epoch": True})
    outcome = train(cfg, tmp_path, show_progress=False)
    assert outcome.summary["status"] == "completed"
    assert not any(key.startswith("diag") for key in outcome.summary)
    assert "diag" not in (outcome.directory / "metrics.jsonl").read_text()


def _recomputed(cfg, weights) -> dict:
    """diagnose on a model built from `cfg` with the safetensors `weights`, on the run's seeded subsets."""
    tokenizer = build_tokenizer(cfg.model)
    data = load_task_data(cfg, tokenizer)
    model = build_model(cfg, data.labels, needs_double_backward=False)
    load_model(model, str(weights), strict=True)
    seed = cfg.diagnostics.resolved_seed(cfg.seed)
    dev, train_batches = diagnostic_batches(data.dev, data.train, tokenizer, cfg.diagnostics, seed)
    return diagnose(model, dev, train_batches, cfg.diagnostics, seed=seed).metrics


def test_the_best_and_the_final_model_are_measured_on_their_own_weights(tmp_path, monkeypatch):
    """Two runs that train alike (dev evaluation scripted): in the first the best epoch is the first, in the second
    the last. save_model keeps each run's best weights: the first run's best and the second's final model. The
    summary's figures must be those of diagnose on exactly these weights, and a best model that is also the final
    one is measured once."""
    cfg = _config(save_model=True, diagnostics=SMALL)
    calls = _counting_diagnose(monkeypatch)
    _scripted_accuracies(monkeypatch, [0.6, 0.5])
    early = train(cfg, tmp_path / "early", show_progress=False)
    assert len(calls) == 2
    _scripted_accuracies(monkeypatch, [0.5, 0.6])
    late = train(cfg, tmp_path / "late", show_progress=False)
    assert len(calls) == 3  # best == final: one measurement

    best, final = early.summary["diagnostics"]["best"], early.summary["diagnostics"]["final"]
    assert (best["epoch"], best["step"]) == (1, STEPS_PER_EPOCH)
    assert (final["epoch"], final["step"]) == (2, 2 * STEPS_PER_EPOCH)
    assert best["diag/dev/loss"] != final["diag/dev/loss"]  # two models, not one measured twice
    for summary_values, weights in [(best, early.directory), (final, late.directory)]:
        expected = _recomputed(cfg, weights / "model" / "model.safetensors")
        for name, value in expected.items():
            if name not in TIMING:
                assert summary_values[name] == pytest.approx(value, rel=1e-6, abs=1e-9, nan_ok=True), name
    assert late.summary["diagnostics"]["best"] == late.summary["diagnostics"]["final"]

    # Where they are recorded (docs/DIAGNOSTICS.md): one metrics.jsonl line per model, as in the summary, and
    # the time apart from training's.
    lines = [r for r in read_jsonl(early.directory / "metrics.jsonl") if r["type"] == "diagnostics"]
    assert [{k: v for k, v in r.items() if k not in ("type", "model")} for r in lines] == [best, final]
    assert [r["model"] for r in lines] == ["best", "final"]
    assert early.summary["diagnostics_wall_time_s"] >= best["diag/wall_time_s"] + final["diag/wall_time_s"]
    docs = (REPO / "docs" / "DIAGNOSTICS.md").read_text()
    for name in ('"type": "diagnostics"', '"model": "best"', "diagnostics_wall_time_s", "train_wall_time_s"):
        assert name in docs


def test_diagnostics_time_is_not_training_time(tmp_path, monkeypatch):
    """diagnose made slow (0.5 s a call): all of it lands in diagnostics_wall_time_s, none in the training time
    (a fraction of a second for this tiny run)."""

    def slow(*args, **kwargs):
        time.sleep(0.5)
        return DiagnosticsResult({"diag/dev/loss": 1.0, "diag/wall_time_s": 1.0}, 1.0)

    monkeypatch.setattr(run_diagnostics_module, "diagnose", slow)
    cfg = _config(eval={"every_n_steps": 1}, diagnostics={"when": "every_eval"})
    outcome = train(cfg, tmp_path, show_progress=False)
    evaluations = 2 * STEPS_PER_EPOCH
    assert outcome.summary["diagnostics_wall_time_s"] >= evaluations * 0.5
    assert outcome.summary["train_wall_time_s"] < evaluations * 0.5


def test_runs_with_the_same_seed_are_measured_on_the_same_examples_and_probes(tmp_path, monkeypatch):
    """Paired comparisons: two strategies with seed 1 get the same subsets and the same probe seed; seed 2 other
    subsets; a fixed diagnostics.seed the same subsets whatever the run's seed."""
    calls = _counting_diagnose(monkeypatch)
    fixed = {**SMALL, "seed": 7}
    for i, overrides in enumerate(
        [
            {"seed": 1},
            {"seed": 1, "strategy": {"name": "gaussian_noise", "sigma": 0.01}},
            {"seed": 2},
            {"seed": 1, "diagnostics": fixed},
            {"seed": 2, "diagnostics": fixed},
        ]
    ):
        train(_config(epochs=1, **({"diagnostics": SMALL} | overrides)), tmp_path / str(i), show_progress=False)
    none, gaussian, seed2, fixed1, fixed2 = calls
    assert none == gaussian and none["seed"] == 1
    assert seed2["seed"] == 2 and seed2["dev"] != none["dev"] and seed2["train"] != none["train"]
    assert fixed1 == fixed2 and fixed1["seed"] == 7 and fixed1["dev"] != none["dev"]


def _interrupt_at(monkeypatch, step: int) -> None:
    calls: list[int] = []
    original = train_module.train_step

    def train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_step", train_step)


@pytest.mark.parametrize(
    ("when", "accuracies", "best_weights_in_checkpoint"),
    [
        ("end", [0.6, 0.5, 0.4], True),  # the best epoch (1) is behind the checkpoint (2): its weights are in it
        ("end", [0.5, 0.6, 0.4], False),  # the checkpoint's own model is the best one
        ("every_eval", [0.6, 0.5, 0.4], False),  # the results so far are in it; no weights needed
    ],
)
def test_a_resumed_run_measures_as_an_uninterrupted_one(
    tmp_path, monkeypatch, when, accuracies, best_weights_in_checkpoint
):
    cfg = _config(epochs=3, checkpoint={"every_epoch": True}, diagnostics={**SMALL, "when": when})
    _scripted_accuracies(monkeypatch, accuracies)
    whole = train(cfg, tmp_path / "whole", show_progress=False)

    _scripted_accuracies(monkeypatch, accuracies[:2])
    _interrupt_at(monkeypatch, 2 * STEPS_PER_EPOCH + 2)  # in epoch 3, after epoch 2's checkpoint
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tmp_path / "cut", show_progress=False)
    directory = tmp_path / "cut" / whole.directory.relative_to(tmp_path / "whole")
    state = torch.load(directory / "checkpoint" / "epoch-2" / "state.pt", weights_only=True)
    assert bool(state["diagnostics"]["best_weights"]) == best_weights_in_checkpoint

    monkeypatch.undo()
    _scripted_accuracies(monkeypatch, accuracies[2:])
    resumed = train(cfg, tmp_path / "cut", show_progress=False)
    assert resumed.summary["resumed_after_epochs"] == [2]
    assert _lines(resumed.directory) == _lines(whole.directory)
    assert _untimed(resumed.summary["diagnostics"]) == _untimed(whole.summary["diagnostics"])
    best_epoch = 1 if accuracies[0] > accuracies[1] else 2
    assert resumed.summary["diagnostics"]["best"]["epoch"] == best_epoch
    # the time of both sessions: the interrupted one measured too (every_eval) or kept weights (end)
    assert resumed.summary["diagnostics_wall_time_s"] > state["diagnostics"]["wall_time_s"] > 0
