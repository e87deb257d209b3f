"""The real hub code path up to the hub call, and the shipped configs on the full local CLUE files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import huggingface_hub.constants as hub_constants
import pytest
import torch

import clue_adv.train as train_module
from clue_adv.config import ModelConfig, load_config
from clue_adv.errors import ClueAdvError
from clue_adv.model import build_tokenizer
from clue_adv.train import all_sources_local, configure_environment, train

REPO = Path(__file__).resolve().parents[1]
SHARED_TNEWS = REPO.parent / "shared" / "data" / "clue" / "tnews"


def _online(monkeypatch):
    """conftest makes every test offline; these tests set the mode themselves so that they can fail."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # read at import: the variable alone is not enough


def test_shipped_config_uses_the_hub_and_fails_fast_offline_with_a_hint(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    cfg = load_config(REPO / "configs" / "tnews" / "baseline.yaml")
    assert cfg.model.name_or_path == "bert-base-chinese" and cfg.model.init == "pretrained"
    assert cfg.data.hub_name == "clue/clue" and not cfg.data.is_local and not all_sources_local(cfg)
    start = time.monotonic()
    with pytest.raises(ClueAdvError, match="point it at a local directory"):
        build_tokenizer(ModelConfig(name_or_path="bert-base-chinese"))
    assert time.monotonic() - start < 30  # no hanging on an unreachable hub


def test_only_an_all_local_config_turns_the_hub_off_and_only_until_restored(monkeypatch):
    _online(monkeypatch)
    hub_cfg = load_config(REPO / "configs" / "tnews" / "baseline.yaml")
    restore = configure_environment(hub_cfg)
    assert "HF_HUB_OFFLINE" not in os.environ and hub_constants.HF_HUB_OFFLINE is False
    restore()

    local_cfg = load_config(REPO / "configs" / "smoke.yaml")
    assert all_sources_local(local_cfg)
    restore = configure_environment(local_cfg)
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert hub_constants.HF_HUB_OFFLINE is True
    restore()
    assert "HF_HUB_OFFLINE" not in os.environ and "HF_DATASETS_OFFLINE" not in os.environ
    assert hub_constants.HF_HUB_OFFLINE is False


@pytest.mark.skipif(not SHARED_TNEWS.is_dir(), reason="../shared/data/clue/tnews is not beside this checkout")
def test_a_shipped_config_runs_on_the_full_local_tnews_files(tmp_path, monkeypatch):
    _online(monkeypatch)  # the run itself must go offline, not rely on the test environment
    offline_during_run = []
    original = train_module.load_task_data

    def spy(*args, **kwargs):
        offline_during_run.append(hub_constants.HF_HUB_OFFLINE)
        return original(*args, **kwargs)

    monkeypatch.setattr(train_module, "load_task_data", spy)
    overrides = [
        f"data.path={SHARED_TNEWS}",
        "data.max_train_samples=256",
        "data.max_eval_samples=256",
        f"model.name_or_path={REPO / 'clue_adv' / 'assets' / 'tokenizer'}",
        "model.init=random",
        "model.architecture={num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}",
        "epochs=1",
        "optim.lr=1e-3",
    ]
    cfg = load_config(REPO / "configs" / "tnews" / "fgm.yaml", overrides)
    assert all_sources_local(cfg)
    outcome = train(cfg, tmp_path, show_progress=False)
    assert outcome.summary["status"] == "completed"
    assert outcome.summary["train_examples"] == 256 and outcome.summary["passes_per_micro_step"]["forward"] == 2
    assert offline_during_run == [True] and hub_constants.HF_HUB_OFFLINE is False


def test_a_local_pretrained_model_directory_is_loaded_offline(tmp_path, monkeypatch, capfd):
    """`model.name_or_path` = a local directory of saved weights (init: pretrained): the run goes offline and
    starts from those weights, not a fresh random init."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    _online(monkeypatch)
    tokenizer_dir = REPO / "clue_adv" / "assets" / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    saved = BertForSequenceClassification(config)
    model_dir = tmp_path / "tiny-pretrained"
    saved.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)

    built, offline_during_run = [], []
    original = train_module.build_model

    def spy(*args, **kwargs):
        model = original(*args, **kwargs)
        built.append(model.get_input_embeddings().weight.detach().clone())
        offline_during_run.append(hub_constants.HF_HUB_OFFLINE)
        return model

    monkeypatch.setattr(train_module, "build_model", spy)
    overrides = [
        f"data.path={REPO / 'clue_adv' / 'assets' / 'tnews'}",
        f"model.name_or_path={model_dir}",
        "data.max_train_samples=64",
        "data.max_eval_samples=64",
        "max_length=32",
        "epochs=1",
    ]
    # The saved head has 2 labels, TNEWS 15: an error naming the switch, before any run directory exists ...
    with pytest.raises(ClueAdvError, match="ignore_mismatched_sizes: true"):
        train(load_config(REPO / "configs" / "tnews" / "baseline.yaml", overrides), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # ... and with it, a new head on the saved encoder.
    overrides.append("model.ignore_mismatched_sizes=true")
    built.clear()
    offline_during_run.clear()
    cfg = load_config(REPO / "configs" / "tnews" / "baseline.yaml", overrides)
    assert cfg.model.init == "pretrained" and all_sources_local(cfg)
    capfd.readouterr()
    outcome = train(cfg, tmp_path / "out", show_progress=False)
    assert "Loading weights" not in capfd.readouterr().err  # transformers' own progress bar is noise here
    assert outcome.summary["status"] == "completed"
    assert offline_during_run == [True] and hub_constants.HF_HUB_OFFLINE is False
    assert torch.equal(built[0], saved.get_input_embeddings().weight.detach())  # the saved weights, not a new init
