"""The real hub code path up to the hub call, and the shipped configs on the full local CLUE files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from clue_adv.config import ModelConfig, load_config
from clue_adv.errors import ClueAdvError
from clue_adv.model import build_tokenizer
from clue_adv.train import all_sources_local, train

REPO = Path(__file__).resolve().parents[1]
SHARED_TNEWS = REPO.parent / "shared" / "data" / "clue" / "tnews"


def test_shipped_config_uses_the_hub_and_fails_fast_offline_with_a_hint():
    cfg = load_config(REPO / "configs" / "tnews" / "baseline.yaml")
    assert cfg.model.name_or_path == "bert-base-chinese" and cfg.model.init == "pretrained"
    assert cfg.data.hub_name == "clue/clue" and not cfg.data.is_local and not all_sources_local(cfg)
    start = time.monotonic()
    with pytest.raises(ClueAdvError, match="point it at a local directory"):
        build_tokenizer(ModelConfig(name_or_path="bert-base-chinese"))  # HF_HUB_OFFLINE=1 in tests
    assert time.monotonic() - start < 30  # no hanging on an unreachable hub


@pytest.mark.skipif(not SHARED_TNEWS.is_dir(), reason="../shared/data/clue/tnews is not beside this checkout")
def test_a_shipped_config_runs_on_the_full_local_tnews_files(tmp_path):
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
