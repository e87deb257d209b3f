"""What a newcomer meets first: a clone that makes sense without the development machines' `../shared` folder
(data, docs), clue_adv running without the extras it does not need (accelerate), a smoke sweep in which every
strategy trains."""

from __future__ import annotations

import os
import re
import site
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from clue_adv.data import ASSETS

USER_FACING = ["clue_adv", "configs", "overrides", "sweeps", "docs", "README.md", "pyproject.toml"]
# `../shared` itself, and the development machines' files under it named without the `..`
DEVELOPMENT_ONLY = re.compile(r"\.\./shared\b|\bshared/(data/clue|models/bert-base-chinese-tokenizer|REGULARIZERS)")


def _text_files() -> list[Path]:
    files = []
    for entry in USER_FACING:
        path = REPO / entry
        for f in [path] if path.is_file() else sorted(path.rglob("*")):
            if f.is_file() and "__pycache__" not in f.parts:
                files.append(f)
    return files


def test_no_user_facing_file_points_at_the_development_machines_shared_folder():
    offenders = []
    for f in _text_files():
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(text.splitlines(), 1):  # U+2028 inside the data only splits a record
            if DEVELOPMENT_ONLY.search(line):
                offenders.append(f"{f.relative_to(REPO)}:{number}: {line.strip()[:100]}")
    assert not offenders, "\n".join(offenders)


def test_every_mention_of_regularizers_md_is_the_projects_own():
    """The mathematics a user needs is in docs/REGULARIZERS.md; a bare `REGULARIZERS.md` would send readers looking."""
    assert (REPO / "docs" / "REGULARIZERS.md").is_file()
    bare = [  # `docs/REGULARIZERS.md`, or a link `](REGULARIZERS.md)` from within docs/
        f"{f.relative_to(REPO)}:{text[: m.start()].count(chr(10)) + 1}"
        for f in _text_files()
        if f.suffix in (".py", ".md", ".yaml", ".toml")
        for text in [f.read_text(encoding="utf-8")]
        for m in re.finditer(r"(?<!docs/)(?<!\]\()REGULARIZERS\.md", text)
    ]
    assert not bare, bare


def test_clue_adv_trains_without_accelerate(tmp_path):
    """accelerate is the `bench` extra: the runner must not need it. A real absence, not a mocked import: python
    runs without site-packages (-S) on a copy of them that leaves accelerate out, so transformers' own checks see
    it missing as they would after `pip uninstall accelerate`."""
    view = tmp_path / "site-packages"
    view.mkdir()
    for directory in [*site.getsitepackages(), site.getusersitepackages()]:
        if not os.path.isdir(directory):
            continue
        for entry in Path(directory).iterdir():
            if not entry.name.lower().startswith("accelerate") and not (view / entry.name).exists():
                (view / entry.name).symlink_to(entry)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(view)]), "OMP_NUM_THREADS": "1"}
    config = tmp_path / "run.yaml"
    config.write_text(
        f"experiment: noaccel\ntask: tnews\ndata: {{path: {ASSETS / 'tnews'}, max_train_samples: 32, "
        f"max_eval_samples: 32}}\nmodel: {{name_or_path: {ASSETS / 'tokenizer'}, init: random, architecture: "
        "{num_hidden_layers: 1, hidden_size: 32, num_attention_heads: 2, intermediate_size: 64}}\n"
        "max_length: 32\nepochs: 1\nstrategy: {name: fgm, epsilon: 0.1, epsilon_unit: relative}\n"
    )
    script = (
        "import importlib.util, sys\n"
        "assert importlib.util.find_spec('accelerate') is None, 'accelerate is still importable'\n"
        "from clue_adv.cli import app\n"
        "sys.argv = ['clue-adv', 'train', '-c', sys.argv[1], '-o', sys.argv[2]]\n"
        "app()\n"
    )
    run = subprocess.run(
        [sys.executable, "-S", "-c", script, str(config), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert list((tmp_path / "out").rglob("summary.json"))


def test_accelerate_is_an_extra_not_a_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0].lower() for r in requirements}

    assert "accelerate" not in names(project["dependencies"])
    extras = project["optional-dependencies"]
    assert "accelerate" in names(extras["bench"]) and "accelerate" in names(extras["dev"])  # tests and CI have it


def test_the_smoke_sweep_sizes_every_perturbation_relative_to_the_embeddings():
    """The quick start's table is a newcomer's first result. Its tiny random-init model has embeddings several times
    smaller than pretrained ones, so an absolute ε stated for bert-base-chinese nearly collapsed a seed of FGM and
    the table read as "FGM hurts": every perturbation in it is sized relative to the embeddings, beside a baseline.
    (That each one trains at these sizes was measured: docs/REGULARIZERS.md, "Perturbation sizes".)"""
    from clue_adv.regularizers.perturb import PerturbationConfig
    from clue_adv.sweep import load_plan

    strategies = [cell.config.strategy for cell in load_plan(REPO / "sweeps" / "smoke.yaml").cells]
    perturbing = [s for s in strategies if isinstance(s, PerturbationConfig)]
    assert {s.name for s in strategies} >= {"none", "fgm"} and perturbing
    assert all(s.epsilon_unit == "relative" for s in perturbing), perturbing
