"""Every shipped config runs: one optimizer step on the bundled sample with the tiny model, finite loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import REPO, TINY_RUN

from clue_adv.config import load_config
from clue_adv.pretrain.config import load_pretrain_config, parse_pretrain_config
from clue_adv.rundir import existing_state
from clue_adv.sweep import load_plan
from clue_adv.train import train

# Every file in configs/ is a whole run config, but for configs/pretrain/ (pretrain configs: tests/test_pretrain.py)
SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "pretrain")
TINY = REPO / "overrides" / "tiny.yaml"
BATCH = 4
# The schema has no max_steps: one epoch over exactly one batch is one optimizer step.
ONE_STEP = {
    **TINY_RUN,
    "data.max_train_samples": BATCH,
    "data.max_eval_samples": BATCH,
    "batch_size": BATCH,
    "max_length": 16,
    "optim.grad_accum_steps": 1,
    "eval.batch_size": BATCH,
}


def test_every_shipped_config_is_found():
    names = {p.relative_to(REPO / "configs").as_posix() for p in SHIPPED}
    assert {"smoke.yaml", "tnews/fgm.yaml", "iflytek/study-gradient_penalty.yaml"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_shipped_config_runs_one_step(path, tmp_path):
    # study configs use the `cls` head and `null` clipping: the tiny override keeps those, only shrinks the run.
    # A holdout carved from the full training file (the proxy study's 5,000) is larger than the bundled sample.
    holdout = ["data.holdout_size=100"] if load_config(path).data.holdout_size else []
    cfg = load_config([path, TINY], [f"{k}={v}" for k, v in ONE_STEP.items()] + holdout)
    outcome = train(cfg, tmp_path, show_progress=False)
    assert outcome.summary["status"] == "completed"
    assert outcome.summary["steps"] == 1
    records = [json.loads(line) for line in (outcome.directory / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["type"] == "train"]
    assert train_losses and all(math.isfinite(x) for x in train_losses)
    assert all(math.isfinite(h["loss"]) for h in outcome.summary["dev_history"])


# configs/proxy/ is the proxy study's own protocol, which stops early by design (its header says why).
PROTOCOLS = [p for p in SHIPPED if p.parent.name != "proxy"]


@pytest.mark.parametrize("path", PROTOCOLS, ids=lambda p: p.relative_to(REPO / "configs").as_posix())
def test_protocol_configs_train_every_epoch(path):
    """The CLUE and study protocols train a fixed number of epochs: no early stopping (it would change what the
    published numbers mean); the study's 50-epoch runs keep resumable checkpoints."""
    cfg = load_config(path)
    assert cfg.eval.early_stopping is None
    if cfg.experiment == "study-protocol":
        assert cfg.checkpoint.every_epoch


# What the runs made before paths became relative to their file recorded, from the repository root: a shipped
# config must still resolve to exactly these there (they are part of a run's identity), and to the same
# directories from anywhere else.
RECORDED = {
    "configs/smoke.yaml": ("clue_adv/assets/tnews", "clue_adv/assets/tokenizer"),
    "configs/proxy/tnews.yaml": (None, "results/proxy-tnews-mlm/tnews/mlm-seed-1/model"),
    "configs/tnews/fgm.yaml": (None, "bert-base-chinese"),
    "configs/tnews/fgm.yaml + overrides/tiny.yaml": ("clue_adv/assets/{task}", "clue_adv/assets/tokenizer"),
    "configs/pretrain/tnews-tiny.yaml": (None, "clue_adv/assets/tokenizer"),
}


def _paths(names: str, root: Path) -> tuple[str | None, str]:
    files = [str(root / name) if root != Path() else name for name in names.split(" + ")]
    cfg = load_pretrain_config(files) if "/pretrain/" in names else load_config(files)
    return cfg.data.path, cfg.model.name_or_path


def test_shipped_paths_are_relative_to_their_file_and_the_same_as_runs_recorded(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    assert {names: _paths(names, Path()) for names in RECORDED} == RECORDED
    monkeypatch.chdir(tmp_path)  # elsewhere, naming the configs by absolute paths: the same directories
    for names, (data, model) in RECORDED.items():
        local = model if model.startswith(("clue_adv", "results")) else None
        assert _paths(names, REPO) == (
            data and str(REPO / data),
            str(REPO / local) if local else model,  # a hub id stays one
        ), names


@pytest.mark.parametrize("named", ["relative", "absolute"])
def test_the_committed_proxy_runs_are_still_the_same_runs(monkeypatch, named):
    """The proxy study resumes with the same sweep command from the repository root (its runs record paths from
    there), however the sweep file is named: its completed runs must still match the sweep's cells."""
    monkeypatch.chdir(REPO)
    root = REPO if named == "absolute" else Path()
    plan = load_plan(root / "sweeps" / "proxy-tnews-select.yaml")
    assert [c.state for c in plan.cells].count("completed") >= 9
    pretrain = load_pretrain_config(root / "configs" / "pretrain" / "proxy-tnews.yaml")
    assert existing_state(pretrain, REPO / "results/proxy-tnews-mlm/tnews/mlm-seed-1", parse_pretrain_config) == (
        "completed"
    )
