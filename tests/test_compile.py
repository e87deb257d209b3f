"""`model.compile`: torch.compile on the training model, for the strategies that have no double backward."""

from __future__ import annotations

import pytest
from conftest import smoke_config

import clue_adv.train as train_module
from clue_adv.errors import ConfigError
from clue_adv.rundir import read_jsonl
from clue_adv.train import train

FD_PENALTY = {"name": "gradient_penalty", "mode": "finite_difference"}


def losses(outcome) -> list[float]:
    return [r["loss"] for r in read_jsonl(outcome.directory / "metrics.jsonl") if r["type"] == "train"]


def test_a_compiled_finite_difference_penalty_trains_like_the_eager_one(tmp_path, monkeypatch):
    """aot_eager traces forward and backward through AOTAutograd (where a double backward would fail) without
    generating code, so it is quick on a CPU; same seed, same batches, so the losses agree to float rounding."""
    compiled_models = []
    original = train_module.build_optimizer

    def spy(model, *args, **kwargs):
        compiled_models.append(model)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(train_module, "build_optimizer", spy)
    common = {
        "strategy": FD_PENALTY,
        "data__max_train_samples": 96,
        "data__max_eval_samples": 64,
        "log_every_n_steps": 1,
    }
    plain = train(smoke_config(**common), tmp_path / "plain", show_progress=False)
    compiled = train(
        smoke_config(**common, **{"model__compile": True, "model__compile_backend": "aot_eager"}),
        tmp_path / "compiled",
        show_progress=False,
    )
    assert plain.summary["status"] == compiled.summary["status"] == "completed"
    # nn.Module.compile sets the compiled call on the module itself (the same object the optimizer holds)
    assert getattr(compiled_models[0], "_compiled_call_impl", None) is None
    assert getattr(compiled_models[1], "_compiled_call_impl", None) is not None
    assert losses(compiled) == pytest.approx(losses(plain), rel=1e-4)
    assert compiled.summary["best_dev_accuracy"] == pytest.approx(plain.summary["best_dev_accuracy"], abs=1 / 64 + 1e-9)


def test_compile_refuses_a_strategy_that_needs_a_double_backward():
    with pytest.raises(ConfigError, match="model.compile: torch.compile has no double backward"):
        smoke_config(**{"strategy": {"name": "gradient_penalty"}, "model__compile": True})


def test_a_compiled_model_saves_plain_parameter_names(tmp_path):
    """save_pretrained of a module compiled in place has no `_orig_mod.` prefixes: predict can load it."""
    from safetensors import safe_open

    cfg = smoke_config(
        **{
            "model__compile": True,
            "model__compile_backend": "aot_eager",
            "data__max_train_samples": 32,
            "data__max_eval_samples": 32,
            "save_model": True,
        }
    )
    outcome = train(cfg, tmp_path, show_progress=False)
    with safe_open(outcome.directory / "model" / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert names and not any("_orig_mod" in n for n in names)
