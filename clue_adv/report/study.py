"""The study this project reproduces (Su Jianlin, 2020) and CLUE's published BERT-base scores: the figures, the
exact variant and protocol each was measured with, and whether an experiment's runs match that setting (only
then does a table carry the study's figure)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from clue_adv.config import parse_config
from clue_adv.data import ASSETS
from clue_adv.errors import ClueAdvError
from clue_adv.regularizers import registry
from clue_adv.report.collect import RunRecord

# The study (Su Jianlin, 2020): bert-base-chinese, one run per cell, dev accuracy (%).
STUDY = {
    "none": {"iflytek": 60.29, "tnews": 56.58},
    "fgm": {"iflytek": 62.46, "tnews": 57.66},
    "gradient_penalty": {"iflytek": 62.31, "tnews": 57.81},
}
STUDY_LABELS = {"none": "baseline", "fgm": "FGM ε = 0.5", "gradient_penalty": "gradient penalty ε = 1"}
# The exact variant each study row was measured with: a run's strategy block must match all of it (a field
# its config lacks, written before the field existed, counts as the field's default). FGM's default is the
# usual PyTorch variant (per-example output, summed losses), which the study's Keras code is not.
STUDY_PARAMS: dict[str, dict[str, Any]] = {
    "none": {},
    "fgm": {
        "epsilon": 0.5,
        "norm": "l2",
        "target": "embedding_matrix",
        "combine": "adversarial_only",
        "epsilon_unit": "absolute",
    },
    "gradient_penalty": {"epsilon": 1.0, "mode": "exact", "target": "embedding_output"},
}
# The study's training protocol (configs/*/study-*.yaml, from its bert4keras scripts): its figures are the best dev
# epoch of 50 under these settings, so a run under another protocol (e.g. CLUE's 3 epochs) gets no study figure.
STUDY_PROTOCOL: dict[str, Any] = {
    "model.head": "cls",
    "epochs": 50,
    "max_length": 128,
    "batch_size": 32,
    "optim.lr": 2e-5,
    "optim.weight_decay": 0.0,
    "optim.schedule": "constant",
    "optim.warmup_ratio": 0.0,
}
CLUE_DEV_BERT_BASE = {"iflytek": 60.37, "tnews": 56.09}  # CLUE's published dev scores, BERT-base
CLUE_TEST_BERT_BASE = {"iflytek": 60.29, "tnews": 56.58}  # CLUE leaderboard test scores, BERT-base

REFERENCE_NOTE = (
    "The study's baseline figures (IFLYTEK 60.29, TNEWS 56.58) equal the CLUE leaderboard *test* scores of "
    "BERT-base; CLUE's published *dev* scores for BERT-base are IFLYTEK 60.37 and TNEWS 56.09. The study's FGM "
    "and gradient-penalty figures are single runs of its own scripts, which keep the best *dev* epoch, so its "
    "gains set a dev number against a test number. The tables here report dev accuracy: compare them with the "
    "dev row, and compare differences with differences."
)


def _is_bundled_sample(path: Any) -> bool:
    """Whether `data.path` points into the package's bundled sample data (clue_adv/assets), which is a
    few hundred records, not CLUE. A relative path is judged both as written (its `clue_adv/assets`
    segment) and resolved from the current directory, since the run may have started elsewhere."""
    if path is None:
        return False
    text = str(path).replace("\\", "/")
    if "clue_adv/assets" in text:
        return True
    resolved = Path(text.replace("{task}", "x")).expanduser().resolve()
    return resolved.is_relative_to(ASSETS.resolve())


def _config_value(config: dict[str, Any], dotted: str) -> Any:
    """A run's value for a dotted field; one its config.yaml lacks (written before the field existed) reads as
    the field's current default."""
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            try:
                node = parse_config({"task": "tnews"}).resolved()  # defaults do not depend on the task
            except ClueAdvError:
                return None
            for k in dotted.split("."):
                node = node[k]
            return node
        node = node[key]
    return node


def matches_study_setting(runs: Iterable[RunRecord]) -> bool:
    """BERT-base (bert-base-chinese, pretrained) on the full data under the study's protocol: the setting of the
    study's numbers."""
    for r in runs:
        model = r.config.get("model", {})
        data = r.config.get("data", {})
        if any(_config_value(r.config, key) != value for key, value in STUDY_PROTOCOL.items()):
            return False
        name = str(model.get("name_or_path", "")).rstrip("/").rsplit("/", 1)[-1]
        if name != "bert-base-chinese" or model.get("init") != "pretrained":
            return False
        if data.get("max_train_samples") is not None or data.get("max_eval_samples") is not None:
            return False
        if _is_bundled_sample(data.get("path")):
            return False
    return True


def study_row(strategy: str, runs: list[RunRecord]) -> str | None:
    if strategy not in STUDY_PARAMS or not runs:
        return None
    defaults = registry()[strategy].config_class().model_dump()
    for r in runs:
        block = {**defaults, **r.config["strategy"]}
        if any(block.get(key) != value for key, value in STUDY_PARAMS[strategy].items()):
            return None
    return strategy
