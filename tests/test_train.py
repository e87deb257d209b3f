"""The training loop end to end on the bundled sample with a tiny BERT."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from conftest import smoke_config

from clue_adv.errors import ConfigError, RunFailed
from clue_adv.regularizers.base import Batch, StepResult
from clue_adv.regularizers.none import NoRegularizer
from clue_adv.rundir import read_jsonl
from clue_adv.train import train

SUMMARY_KEYS = {
    "status", "task", "strategy", "seed", "best_dev_accuracy", "best_dev_macro_f1", "best_epoch",
    "final_dev_accuracy", "final_dev_macro_f1", "epochs", "steps", "train_wall_time_s", "mean_step_time_s",
    "samples_per_s", "peak_memory_mb", "device", "versions", "git_commit", "dev_history", "passes_per_micro_step",
    "final_train_loss", "eval_wall_time_s", "host",
}  # fmt: skip


def _train_losses(directory):
    return [r["loss"] for r in read_jsonl(directory / "metrics.jsonl") if r["type"] == "train"]


def test_same_seed_same_losses_and_complete_run_files(tmp_path):
    a = train(smoke_config(), tmp_path / "a", show_progress=False)
    b = train(smoke_config(), tmp_path / "b", show_progress=False)
    assert _train_losses(a.directory) == _train_losses(b.directory) and len(_train_losses(a.directory)) == 4
    c = train(smoke_config(seed=2), tmp_path / "c", show_progress=False)
    assert _train_losses(c.directory) != _train_losses(a.directory)

    assert a.directory == (tmp_path / "a" / "test" / "tnews" / "none" / "seed-1").resolve()
    summary = json.loads((a.directory / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary), SUMMARY_KEYS - set(summary)
    assert summary["status"] == "completed" and summary["steps"] == 16
    assert summary["passes_per_micro_step"] == {"forward": 1.0, "backward": 1.0, "double_backward": 0.0}
    assert 0 <= summary["best_dev_accuracy"] <= 1 and summary["best_epoch"] == 1
    evals = [r for r in read_jsonl(a.directory / "metrics.jsonl") if r["type"] == "eval"]
    assert evals[-1]["accuracy"] == summary["final_dev_accuracy"]
    assert (a.directory / "config.yaml").read_text().startswith("experiment: test\n")


def test_two_strategies_with_one_seed_see_the_same_batches(tmp_path, monkeypatch):
    seen: dict[str, list[torch.Tensor]] = {}
    current = []
    original = Batch.from_mapping.__func__

    def recording(cls, data, device):
        current.append(data["input_ids"].clone())
        return original(cls, data, device)

    monkeypatch.setattr(Batch, "from_mapping", classmethod(recording))
    for name in ("none", "gaussian_noise"):
        current.clear()
        # Two epochs: the first epoch's order comes before any strategy draws random numbers, so only a later
        # epoch shows a sampler that shuffles with the global RNG (which gaussian_noise advances) instead of its own.
        train(smoke_config(strategy={"name": name}, epochs=2), tmp_path, show_progress=False)
        seen[name] = list(current)
    assert len(seen["none"]) == 32  # 512 examples / batch 32, twice
    assert all(torch.equal(x, y) for x, y in zip(seen["none"], seen["gaussian_noise"], strict=True))


@pytest.mark.slow
def test_smoke_training_beats_the_majority_class(tmp_path):
    cfg = smoke_config(data={"path": smoke_config().data.path, "max_eval_samples": 1000}, epochs=3)
    outcome = train(cfg, tmp_path, show_progress=False)
    labels = [json.loads(line)["label"] for line in open(cfg.data.path + "/dev.json", encoding="utf-8")]
    majority = max(labels.count(x) for x in set(labels)) / len(labels)
    assert outcome.summary["best_dev_accuracy"] > majority + 0.10, (outcome.summary["best_dev_accuracy"], majority)


def test_completed_run_is_skipped_and_a_changed_config_refused(tmp_path):
    first = train(smoke_config(), tmp_path, show_progress=False)
    again = train(smoke_config(), tmp_path, show_progress=False)
    assert again.skipped and again.summary == first.summary
    with pytest.raises(ConfigError, match=r"different config \(differs in: optim\.lr\);"):
        train(smoke_config(optim={"lr": 5e-4}), tmp_path, show_progress=False)
    forced = train(smoke_config(), tmp_path, force=True, show_progress=False)
    assert not forced.skipped and forced.summary["started_at"] >= first.summary["started_at"]

    # A run made before a field existed (its config.yaml lacks model.compile, now at its default) is the same run
    # after the upgrade: skipped, not refused; a real difference in that field is still named exactly.
    stored = forced.directory / "config.yaml"
    old = yaml.safe_load(stored.read_text())
    del old["model"]["compile"]
    stored.write_text(yaml.safe_dump(old))
    assert train(smoke_config(), tmp_path, show_progress=False).skipped
    with pytest.raises(ConfigError, match=r"differs in: model\.compile\);"):
        train(smoke_config(model__compile=True), tmp_path, show_progress=False)


def _fail_at(step_to_fail: int, exc):
    calls = {"n": 0}
    original = NoRegularizer.training_step

    def step(self, ctx):
        calls["n"] += 1
        if calls["n"] == step_to_fail:
            if exc is None:
                return StepResult(torch.tensor(math.nan))
            raise exc
        return original(self, ctx)

    return step


def test_non_finite_loss_marks_the_run_failed_with_its_step(tmp_path, monkeypatch):
    monkeypatch.setattr(NoRegularizer, "training_step", _fail_at(3, None))
    with pytest.raises(RunFailed, match="non-finite loss at step 3"):
        train(smoke_config(), tmp_path, show_progress=False)
    directory = tmp_path / "test" / "tnews" / "none" / "seed-1"
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_step"] == 3 and summary["failed_quantity"] == "loss"
    # a failed run is rerun (not skipped) next time
    monkeypatch.undo()
    assert train(smoke_config(), tmp_path, show_progress=False).summary["status"] == "completed"


def test_ctrl_c_marks_the_run_interrupted_and_files_stay_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(NoRegularizer, "training_step", _fail_at(10, KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        train(smoke_config(), tmp_path, show_progress=False)
    directory = tmp_path / "test" / "tnews" / "none" / "seed-1"
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["interrupted_step"] == 9
    raw = (directory / "metrics.jsonl").read_text()
    assert raw.endswith("\n") and all(json.loads(line) for line in raw.splitlines())
    assert not list(directory.glob(".*tmp*"))


def _no_dropout_config(samples: int = 64, **overrides):
    base = smoke_config()
    arch = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
            "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}  # fmt: skip
    return smoke_config(
        epochs=1,
        log_every_n_steps=1,
        data={"path": base.data.path, "max_train_samples": samples, "max_eval_samples": 32},
        model={**base.model.model_dump(), "architecture": arch},
        **overrides,
    )


@pytest.mark.parametrize("samples", [64, 48, 56])
def test_gradient_accumulation_matches_a_bigger_batch(tmp_path, samples):
    """Two micro-batches of 16 with accumulation 2 give the same update as one batch of 32; with 48 examples the
    epoch's last window holds one micro-batch, which must be scaled by 1, not 1/2 (as the last batch of 16 is).
    With 56 the last window is 16 + 8 examples against one batch of 24: each micro-batch weighs its share of the
    window's examples (16/24 and 8/24; averaging the two micro-batch means, ½ and ½, gives another gradient)."""
    big = train(_no_dropout_config(samples, batch_size=32), tmp_path / "big", show_progress=False)
    small = train(
        _no_dropout_config(samples, batch_size=16, optim={"lr": 1e-3, "grad_accum_steps": 2}),
        tmp_path / "small",
        show_progress=False,
    )

    def grad_norms(outcome):
        return [r["grad_norm"] for r in read_jsonl(outcome.directory / "metrics.jsonl") if r["type"] == "train"]

    assert big.summary["steps"] == small.summary["steps"] == 2
    # Same examples per optimizer step, so the same gradient up to float summation order (padding widths differ
    # between 16- and 32-example batches; with attention masks that changes nothing).
    assert grad_norms(small) == pytest.approx(grad_norms(big), rel=1e-4)


def _window_gradients(model, window):
    """The parameter gradients train_step's window leaves just before clipping (read by its on_gradients hook)."""
    from clue_adv.regularizers.none import NoneConfig
    from clue_adv.train import Learner, train_step

    seen = {}

    def snapshot():
        seen.update({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})

    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the weights stay for the next window
    train_step(Learner(model, NoRegularizer(NoneConfig()), optimizer), window, on_gradients=snapshot)
    return seen


def test_a_window_of_uneven_micro_batches_follows_the_mean_loss_over_its_examples(tokenizer):
    """Eight examples as one batch, as 4 + 4 and as 4 + 2 + 2 micro-batches: the same gradient (each micro-batch
    weighs by its examples, not 1/3 each), checked against a plain backward of the 8-example mean loss."""
    from conftest import tiny_bert

    from clue_adv.data import ASSETS

    lines = (ASSETS / "tnews" / "train.json").read_text(encoding="utf-8").splitlines()[:8]
    sentences = [json.loads(line)["sentence"] for line in lines]
    labels = torch.arange(8) % 5

    def batch(lo, hi):  # each micro-batch padded to its own longest example, as the collator does
        enc = tokenizer(sentences[lo:hi], padding=True, return_tensors="pt")
        return Batch.from_mapping({**enc, "labels": labels[lo:hi]}, torch.device("cpu"))

    model = tiny_bert(dtype=torch.float64, dropout=0.0)
    model.train()
    whole = batch(0, 8)
    model.zero_grad()
    logits = model(input_ids=whole.input_ids, attention_mask=whole.attention_mask, token_type_ids=whole.token_type_ids)
    torch.nn.functional.cross_entropy(logits.logits, whole.labels).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    for cuts in ([(0, 8)], [(0, 4), (4, 8)], [(0, 4), (4, 6), (6, 8)]):
        actual = _window_gradients(model, [batch(lo, hi) for lo, hi in cuts])
        assert actual.keys() == expected.keys()
        for name, want in expected.items():
            torch.testing.assert_close(actual[name], want, rtol=1e-10, atol=1e-12, msg=f"{cuts}: {name}")


def test_out_of_memory_marks_the_run_failed_with_advice(tmp_path, monkeypatch):
    monkeypatch.setattr(NoRegularizer, "training_step", _fail_at(2, torch.OutOfMemoryError("CUDA out of memory")))
    with pytest.raises(RunFailed, match="out of memory at step 2: lower batch_size .*grad_accum_steps"):
        train(smoke_config(), tmp_path, show_progress=False)
    summary = json.loads((tmp_path / "test" / "tnews" / "none" / "seed-1" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_step"] == 2
    assert "grad_accum_steps" in summary["advice"]


def test_optimizer_is_fused_and_spares_biases_and_layernorm():
    from conftest import tnews_labels

    from clue_adv.model import build_model
    from clue_adv.train import build_optimizer, pad_multiple_for

    cfg = smoke_config()
    model = build_model(cfg, tnews_labels(), needs_double_backward=False)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert opt.defaults["fused"] is True and opt.defaults["lr"] == cfg.optim.lr
    decay, no_decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == cfg.optim.weight_decay and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith("bias") or "LayerNorm" in names[id(p)] for p in no_decay["params"])
    assert not any(names[id(p)].endswith("bias") for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert pad_multiple_for(torch.device("cpu")) is None and pad_multiple_for(torch.device("cuda")) == 8


def test_every_strategy_starts_from_the_same_weights(tmp_path, monkeypatch):
    """Runs are paired by seed: with the same seed, every strategy's model starts from identical weights (the
    other half of pairing, besides identical batches), whatever attention it needs (eager for a double backward)
    and whatever its setup does (SMART copies the model)."""
    import clue_adv.train as train_module

    initial: dict[str, dict[str, torch.Tensor]] = {}
    original = train_module.build_model

    def spy(cfg, *args, **kwargs):
        model = original(cfg, *args, **kwargs)
        initial[cfg.strategy.name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return model

    monkeypatch.setattr(train_module, "build_model", spy)
    for strategy in ({"name": "none"}, {"name": "gradient_penalty"}, {"name": "smart"}, {"name": "consistency"}):
        cfg = smoke_config(strategy=strategy, data__max_train_samples=32, data__max_eval_samples=32)
        train(cfg, tmp_path / strategy["name"], show_progress=False)
    reference = initial.pop("none")
    assert set(initial) == {"gradient_penalty", "smart", "consistency"}
    for name, weights in initial.items():
        assert weights.keys() == reference.keys(), name
        assert all(torch.equal(weights[k], reference[k]) for k in reference), name


def test_config_yaml_records_the_output_folder_the_run_is_in(tmp_path):
    outcome = train(smoke_config(data__max_train_samples=32, data__max_eval_samples=32), tmp_path, show_progress=False)
    stored = yaml.safe_load((outcome.directory / "config.yaml").read_text())
    assert stored["output_dir"] == str(tmp_path) and outcome.directory.is_relative_to(tmp_path)


def test_a_run_failing_after_an_evaluation_keeps_what_it_reached(tmp_path, monkeypatch):
    """Epoch 1 is evaluated (16 steps), then step 20's loss is NaN: the summary keeps the dev accuracy reached so
    far under names the report does not take for a finished result."""
    monkeypatch.setattr(NoRegularizer, "training_step", _fail_at(20, None))
    with pytest.raises(RunFailed):
        train(smoke_config(epochs=2), tmp_path, show_progress=False)
    summary = json.loads((tmp_path / "test" / "tnews" / "none" / "seed-1" / "summary.json").read_text())
    assert summary["status"] == "failed" and "best_dev_accuracy" not in summary
    assert summary["best_epoch_so_far"] == 1 and len(summary["dev_history"]) == 1
    assert summary["best_dev_accuracy_so_far"] == summary["dev_history"][0]["accuracy"] > 0
