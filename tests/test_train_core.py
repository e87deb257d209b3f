"""The run core around the loop: environment restored, fail-fast checks, setup out-of-memory, non-finite gradients,
mid-epoch evaluation, label smoothing, a real SIGINT or SIGTERM, and early stopping."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time

import huggingface_hub.constants as hub_constants
import pytest
import torch
import torch.nn.functional as F
from conftest import TOKENIZER_DIR, sigint_as_in_a_terminal, sigint_ignored_as_in_a_background_job, smoke_config

import clue_adv.runenv as runenv
import clue_adv.train as train_module
from clue_adv.errors import ClueAdvError, ConfigError, RunFailed
from clue_adv.rundir import read_jsonl
from clue_adv.train import train

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
RUN_DIR = ("test", "tnews", "none", "seed-1")


def _tiny(**overrides):
    base = smoke_config()
    arch = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # fmt: skip
    overrides.setdefault("data", {"path": base.data.path, "max_train_samples": 64, "max_eval_samples": 32})
    fields = {"epochs": 1, "log_every_n_steps": 1, "model": {**base.model.model_dump(), "architecture": arch}}
    return smoke_config(**(fields | overrides))


def _summary(tmp_path):
    return json.loads(tmp_path.joinpath(*RUN_DIR, "summary.json").read_text())


def _wrap_build_model(monkeypatch, after):
    original = train_module.build_model

    def build(*args, **kwargs):
        model = original(*args, **kwargs)
        after(model)
        return model

    monkeypatch.setattr(train_module, "build_model", build)


def test_a_local_run_is_offline_only_while_it_runs(tmp_path, monkeypatch):
    for name in OFFLINE_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    seen = {}
    original = train_module.load_task_data

    def spy(*args, **kwargs):
        seen.update({name: os.environ.get(name) for name in OFFLINE_VARS}, constant=hub_constants.HF_HUB_OFFLINE)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "load_task_data", spy)
    assert train(_tiny(), tmp_path, show_progress=False).summary["status"] == "completed"
    assert seen == {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "constant": True}
    assert not any(name in os.environ for name in OFFLINE_VARS)
    assert hub_constants.HF_HUB_OFFLINE is False

    # restored on an error too, and a value set before the run is put back as it was
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    monkeypatch.setattr(train_module, "load_task_data", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        train(_tiny(), tmp_path / "err", show_progress=False)
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_DATASETS_OFFLINE"] == "0"
    assert hub_constants.HF_HUB_OFFLINE is False


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("data", {"path": "/nonexistent/tnews"}, "data.path: directory not found: /nonexistent/tnews"),
        ("train_file", "missing.json", "data.train_file: file not found"),
    ],
)
def test_a_missing_file_fails_before_any_tokenizing(tmp_path, monkeypatch, field, value, problem):
    def no_tokenizer(*args, **kwargs):
        raise AssertionError("tokenizer built before the paths were checked")

    monkeypatch.setattr(train_module, "build_tokenizer", no_tokenizer)
    if field == "train_file":
        cfg = smoke_config(data={"path": smoke_config().data.path, "train_file": value})
    else:
        cfg = smoke_config(data=value)
    with pytest.raises(ConfigError) as excinfo:
        train(cfg, tmp_path, show_progress=False)
    assert excinfo.value.exit_code == 2 and any(problem in p for p in excinfo.value.problems), excinfo.value
    assert not any(tmp_path.iterdir())  # nothing written


def test_a_tokenizer_larger_than_the_embedding_fails_with_both_sizes(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    def bigger(cfg):
        tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        tokenizer.add_tokens(["[EXTRA1]", "[EXTRA2]"])
        return tokenizer

    monkeypatch.setattr(train_module, "build_tokenizer", bigger)
    with pytest.raises(ClueAdvError, match=r"tokenizer has 21130 tokens but the model's vocab_size is 21128") as e:
        train(_tiny(), tmp_path, show_progress=False)
    assert e.value.exit_code == 2
    assert not any(tmp_path.iterdir())


def _raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory")


@pytest.mark.parametrize("where", ["model.to", "build_optimizer"])
def test_out_of_memory_during_setup_is_a_failed_run_with_advice(tmp_path, monkeypatch, where):
    if where == "build_optimizer":
        monkeypatch.setattr(train_module, "build_optimizer", _raise_oom)
    else:
        _wrap_build_model(monkeypatch, lambda model: setattr(model, "to", _raise_oom))
    with pytest.raises(RunFailed, match="out of memory during setup: lower batch_size .*grad_accum_steps") as e:
        train(_tiny(), tmp_path, show_progress=False)
    assert e.value.exit_code == RunFailed.exit_code == 1
    summary = _summary(tmp_path)
    assert summary["status"] == "failed" and summary["error"] == "out of memory" and summary["steps"] == 0
    assert "grad_accum_steps" in summary["advice"]


def test_a_non_finite_gradient_with_a_finite_loss_fails_the_run(tmp_path, monkeypatch):
    def poison(model):
        model.classifier.weight.register_hook(lambda grad: grad * float("nan"))

    _wrap_build_model(monkeypatch, poison)
    with pytest.raises(RunFailed, match="non-finite gradient norm at step 1"):
        train(_tiny(), tmp_path, show_progress=False)
    summary = _summary(tmp_path)
    assert summary["status"] == "failed" and summary["failed_step"] == 1
    assert summary["failed_quantity"] == "gradient norm"


def test_eval_every_n_steps_evaluates_at_those_steps_and_at_the_end(tmp_path):
    outcome = train(smoke_config(eval={"every_n_steps": 5}), tmp_path, show_progress=False)  # 16 steps
    evals = [r for r in read_jsonl(outcome.directory / "metrics.jsonl") if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [5, 10, 15, 16]
    assert [h["step"] for h in outcome.summary["dev_history"]] == [5, 10, 15, 16]


def test_label_smoothing_changes_the_first_loss_by_the_expected_amount(tmp_path, monkeypatch):
    initial, batches = [], []
    _wrap_build_model(monkeypatch, lambda model: initial.append(copy.deepcopy(model)))
    original = train_module.Batch.from_mapping.__func__

    def recording(cls, data, device):
        batches.append({k: v.clone() for k, v in data.items()})
        return original(cls, data, device)

    monkeypatch.setattr(train_module.Batch, "from_mapping", classmethod(recording))
    outcome = train(_tiny(label_smoothing=0.9), tmp_path, show_progress=False)
    first_loss = next(r["loss"] for r in read_jsonl(outcome.directory / "metrics.jsonl") if r["type"] == "train")

    first = dict(batches[0])
    labels = first.pop("labels")
    with torch.no_grad():
        logits = initial[0](**first).logits  # dropout is 0: train and eval mode give the same logits
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.9).item()
    plain = F.cross_entropy(logits, labels).item()
    assert abs(smoothed - plain) > 1e-4  # near-uniform logits at init: small, but 100x the tolerance below
    assert first_loss == pytest.approx(smoothed, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, started",
    [
        (signal.SIGINT, sigint_as_in_a_terminal),
        (signal.SIGTERM, sigint_as_in_a_terminal),
        (signal.SIGTERM, sigint_ignored_as_in_a_background_job),
    ],
    ids=["SIGINT", "SIGTERM", "SIGTERM-with-SIGINT-ignored"],
)
def test_sigint_or_sigterm_exits_130_and_marks_the_run_interrupted(tmp_path, signum, started):
    """Ctrl-C, and SIGTERM (kill, timeout, a scheduler's time limit), which would otherwise leave it 'running'.
    Ctrl-C as from a terminal; SIGTERM also for a script's background job, which inherits SIGINT ignored (and
    keeps ignoring it, as the shell asked) but must still stop on kill."""
    from test_kill_resume import RUN

    config = tmp_path / "run.yaml"
    config.write_text(RUN.replace("epochs: 2", "epochs: 500"))  # far longer than the test waits
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "clue_adv", "train", "-c", str(config), "-o", str(out)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, preexec_fn=started
    )
    try:
        deadline = time.monotonic() + 120
        metrics = None
        while time.monotonic() < deadline and proc.poll() is None:
            found = list(out.rglob("metrics.jsonl"))
            if found and any(r.get("type") == "train" for r in read_jsonl(found[0])):
                metrics = found[0]
                break
            time.sleep(0.2)
        assert metrics is not None, proc.stderr.read().decode() if proc.poll() is not None else "no training step"
        proc.send_signal(signum)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert rc == 130, proc.stderr.read().decode()
    summary = json.loads((metrics.parent / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_step"] >= 1


def test_a_hub_run_says_once_how_to_run_offline_before_trying_the_hub(tmp_path, monkeypatch):
    """Without a network the hub's retries take about a minute: the note comes first, once per process, and not
    when HF_HUB_OFFLINE is set or everything is local."""
    import io

    from rich.console import Console

    def no_training(*args, **kwargs):
        raise ClueAdvError("stop here")

    monkeypatch.setattr(train_module, "_train", no_training)
    monkeypatch.setattr(train_module, "_check_paths", lambda cfg: None)
    monkeypatch.setattr(runenv, "_hub_note_shown", False)
    hub = smoke_config(model={"name_or_path": "bert-base-chinese", "init": "pretrained"})

    def attempt(cfg, env: str | None) -> str:
        if env is None:
            monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        else:
            monkeypatch.setenv("HF_HUB_OFFLINE", env)
        screen = io.StringIO()
        with pytest.raises(ClueAdvError, match="stop here"):
            train(cfg, tmp_path, show_progress=False, console=Console(file=screen, width=300))
        return screen.getvalue()

    assert attempt(hub, "1") == ""
    assert attempt(smoke_config(), None) == ""  # every source local
    assert "set HF_HUB_OFFLINE=1" in attempt(hub, None)
    assert attempt(hub, None) == ""  # once per process


def _scripted_accuracies(monkeypatch, accuracies):
    """Replace dev evaluation by a scripted sequence of accuracies (the rule is checked, not the model)."""
    script = iter(accuracies)

    def scripted(*args, **kwargs):
        return {"accuracy": next(script), "macro_f1": 0.0, "loss": 1.0, "examples": 32}

    monkeypatch.setattr(train_module, "evaluate", scripted)


@pytest.mark.parametrize(
    ("patience", "stopped_at"),
    # reference 0.50; 0.60 beats 0.50 + 0.02 (reference 0.60); 0.61, 0.615 and 0.59 do not beat 0.62: patience 2
    # stops at the 4th evaluation, patience 3 at the 5th; with patience 4, 0.70 beats 0.62 and the run goes on.
    [(2, 4), (3, 5), (4, None)],
)
def test_early_stopping_stops_after_patience_evaluations_without_a_min_delta_improvement(
    tmp_path, monkeypatch, patience, stopped_at
):
    _scripted_accuracies(monkeypatch, [0.50, 0.60, 0.61, 0.615, 0.59, 0.70, 0.65])
    cfg = _tiny(epochs=7, eval={"early_stopping": {"patience": patience, "min_delta": 0.02}})
    outcome = train(cfg, tmp_path, show_progress=False)  # 2 steps per epoch
    summary = outcome.summary
    assert summary["status"] == "completed"
    if stopped_at is None:
        assert "stopped_early_at_epoch" not in summary and summary["steps"] == 14
        return
    assert summary["stopped_early_at_epoch"] == stopped_at and summary["stopped_early_at_step"] == 2 * stopped_at
    assert summary["steps"] == 2 * stopped_at and len(summary["dev_history"]) == stopped_at
    assert summary["best_dev_accuracy"] == 0.615 and summary["best_epoch"] == 4  # the best is still the best seen


def test_early_stopping_at_a_mid_epoch_evaluation_stops_there(tmp_path, monkeypatch):
    _scripted_accuracies(monkeypatch, [0.5, 0.4, 0.3, 0.9])
    cfg = _tiny(epochs=3, eval={"every_n_steps": 1, "early_stopping": {"patience": 2}})
    outcome = train(cfg, tmp_path, show_progress=False)
    evals = [r for r in read_jsonl(outcome.directory / "metrics.jsonl") if r["type"] == "eval"]
    assert [(r["epoch"], r["step"]) for r in evals] == [(1, 1), (1, 2), (2, 3)]
    assert outcome.summary["stopped_early_at_epoch"] == 2 and outcome.summary["stopped_early_at_step"] == 3
    assert outcome.summary["steps"] == 3


def test_early_stopping_is_off_by_default_and_its_fields_are_checked():
    assert _tiny().eval.early_stopping is None
    with pytest.raises(ConfigError) as e:
        _tiny(eval={"early_stopping": {"patience": 0, "min_delta": -1}})
    assert any("eval.early_stopping.patience" in p for p in e.value.problems)
    assert any("eval.early_stopping.min_delta" in p for p in e.value.problems)
    with pytest.raises(ConfigError) as e:
        _tiny(eval={"early_stopping": {"patiense": 2}})
    assert "eval.early_stopping.patiense: unknown field (did you mean 'patience'?)" in e.value.problems
