"""The checks a config needs the filesystem for: the files and directories it names, max_length against the model's
positions, the packages of the experiment trackers it asks for, the contents of the local data. `clue-adv validate`
reports them with the rest; the sweep's planner makes them for every cell, training before minutes of tokenizing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clue_adv.config import TASKS, DataConfig, RunConfig, expand_path, path_problem
from clue_adv.data import check_holdout, read_labels, read_split
from clue_adv.errors import ClueAdvError, DataError
from clue_adv.model import check_safetensors, looks_local, model_max_positions
from clue_adv.trackers import missing_packages

if TYPE_CHECKING:
    from clue_adv.pretrain.config import PretrainConfig


@dataclass(frozen=True)
class Sources:
    """The fields the filesystem checks need, taken from a valid RunConfig or, when the schema fails, from
    the raw merged dict (None where a field is absent or not usable)."""

    task: str | None
    data_path: str | None
    train_file: str
    dev_file: str
    max_train_samples: int | None
    max_eval_samples: int | None
    model: str | None
    tokenizer: str | None
    max_length: int | None
    pretrained: bool = True  # model.init: pretrained (its weights must be there), or random (config only)
    holdout_size: int = 0  # data.holdout_size: training rows held out (the training file is then read whole)
    trackers: tuple[str, ...] = ()  # logging.trackers: each needs its package installed

    @classmethod
    def of(cls, cfg: RunConfig) -> Sources:
        d = cfg.data
        return cls(
            cfg.task,
            d.path,
            d.train_file,
            d.dev_file,
            d.max_train_samples,
            d.max_eval_samples,
            cfg.model.name_or_path,
            cfg.model.tokenizer,
            cfg.max_length,
            cfg.model.init == "pretrained",
            d.holdout_size,
            tuple(cfg.logging.trackers),
        )

    @classmethod
    def raw(cls, data: dict[str, Any]) -> Sources:
        def block(name: str) -> dict[str, Any]:
            value = data.get(name)
            return value if isinstance(value, dict) else {}

        def text(d: dict[str, Any], key: str, default: str | None = None) -> str | None:
            return d[key] if isinstance(d.get(key), str) else default

        def positive(d: dict[str, Any], key: str) -> int | None:
            value = d.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

        d, m = block("data"), block("model")
        trackers = block("logging").get("trackers")
        defaults = DataConfig.model_fields
        task = data.get("task")
        return cls(
            task if isinstance(task, str) and task in TASKS else None,
            text(d, "path"),
            text(d, "train_file", defaults["train_file"].default) or "train.json",
            text(d, "dev_file", defaults["dev_file"].default) or "dev.json",
            positive(d, "max_train_samples"),
            positive(d, "max_eval_samples"),
            text(m, "name_or_path"),
            text(m, "tokenizer"),
            positive(data, "max_length"),
            m.get("init", "pretrained") != "random",
            positive(d, "holdout_size") or 0,
            tuple(t for t in trackers if isinstance(t, str)) if isinstance(trackers, list) else (),
        )

    def local_dir(self) -> Path | None:
        if self.data_path is None:
            return None
        return expand_path(self.data_path.replace("{task}", self.task or "{task}"))


def _where(expanded: Path) -> str:
    """A relative path here is from the current directory (a config file's own paths have been resolved from its
    folder already, a `--set` path is the user's as given): say which. (`~` paths are absolute once expanded.)"""
    return "" if expanded.is_absolute() else f" (relative to the current directory {Path.cwd()})"


def path_problems(s: Sources) -> list[str]:
    problems = []
    root = s.local_dir()
    if root is not None and (s.task is not None or "{task}" not in (s.data_path or "")):
        if not root.is_dir():
            problems.append(f"data.path: directory not found: {root}{_where(root)}")
        else:
            for field, name in (("labels", "labels.json"), ("train_file", s.train_file), ("dev_file", s.dev_file)):
                if path_problem(name, expands=False):  # the schema names it; a stat() of it would raise
                    continue
                if not (root / name).is_file():
                    problems.append(f"data.{field}: file not found: {root / name}")
    for field, name in (("model.name_or_path", s.model), ("model.tokenizer", s.tokenizer)):
        if not name or not looks_local(name):
            continue
        where = expand_path(name)
        if where is None:  # a name no directory can have (e.g. `~user` naming no user): the schema says so
            continue
        if not where.is_dir():
            problems.append(f"{field}: directory not found: {name}{_where(where)}")
            continue
        # What training will read from the directory, checked now rather than after tokenizing
        if field == "model.name_or_path" and not (where / "config.json").is_file():
            problems.append(f"{field}: {name} has no config.json (a model directory needs one)")
        if (field == "model.tokenizer" or not s.tokenizer) and not (
            any((where / f).is_file() for f in ("vocab.txt", "tokenizer.json", "vocab.json"))
            or any(where.glob("*.model"))  # sentencepiece
        ):
            problems.append(f"{field}: {name} has no tokenizer files (vocab.txt, tokenizer.json, ...)")
        if field == "model.name_or_path" and s.pretrained:
            try:  # pretrained weights from a local directory: safetensors there, as training will insist
                check_safetensors(name)
            except ClueAdvError as e:
                problems.append(e.message)
    local_model = s.model is not None and looks_local(s.model) and expand_path(s.model) is not None
    positions = model_max_positions(s.model) if local_model else None
    if positions is not None and s.max_length is not None and s.max_length > positions:
        problems.append(f"max_length: {s.max_length} exceeds the model's {positions} positions")
    return problems + missing_packages(dict.fromkeys(s.trackers))


def hub_position_check(s: Sources) -> tuple[list[str], list[str]]:
    """max_length against a hub model's positions, from the HF cache only (validate never uses the network).
    Returns (problems, notes): a model whose config is not cached gets a note, so the gap is visible."""
    if not s.model or looks_local(s.model) or s.max_length is None:
        return [], []
    from transformers import AutoConfig  # heavy: imported only when a hub model is checked

    try:
        config = AutoConfig.from_pretrained(s.model, local_files_only=True)
    except OSError:
        return [], [f"max_length not checked: {s.model}'s config is not in the local Hugging Face cache"]
    except Exception as e:  # best effort: any failure means "not checked", never a crash
        return [], [f"max_length not checked: {s.model}'s config could not be read ({type(e).__name__}: {e})"]
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and s.max_length > positions:
        return [f"max_length: {s.max_length} exceeds the model's {positions} positions ({s.model})"], []
    return [], []


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_vars() -> list[str]:
    """The Hugging Face variables that switch the hub off in this environment, e.g. ['HF_HUB_OFFLINE=1']."""
    return [
        f"{v}={os.environ[v]}" for v in _OFFLINE_VARS if os.environ.get(v, "").upper() in ("1", "TRUE", "ON", "YES")
    ]


def offline_hub_warning(sources: list[Sources]) -> str | None:
    """When the environment is offline and some config reads from the hub, a plain statement that the hub can be
    neither reached nor checked: every check here passes on a hub name, and the run fails in setup unless the
    Hugging Face cache already holds it. None when online or when every source is local."""
    switched_off = offline_vars()
    if not switched_off:
        return None
    names: list[str] = []
    for s in sources:
        if s.data_path is None:
            names.append("the hub dataset (data.path is not set)")
        for name in (s.model, s.tokenizer):
            if name and not looks_local(name):
                names.append(name)
    names = list(dict.fromkeys(names))
    if not names:
        return None
    return (
        f"{' and '.join(switched_off)}: the hub cannot be reached, and nothing here can check it: "
        f"{', '.join(names)} must already be in the local Hugging Face cache, or the run fails when it starts; "
        "point data.path and model.name_or_path at local directories to run offline"
    )


def data_problems(s: Sources) -> list[str]:
    """Contents of the local data, read the way training reads it (same records, same limits) but not
    tokenized: labels.json's size, then each split's first problem (bad line, unknown label, no records)."""
    root = s.local_dir()
    if root is None or s.task is None or not (root / "labels.json").is_file():
        return []
    try:
        labels = read_labels(root / "labels.json")
    except DataError as e:
        return [f"data: {e.message}"]
    problems = []
    expected = TASKS[s.task]
    if len(labels.ids) != expected:
        problems.append(f"data: {s.task} has {expected} labels but {root / 'labels.json'} lists {len(labels.ids)}")
    # A holdout is drawn from the whole training file (data._train_read_limit), so all of it is read then.
    train_limit = None if s.holdout_size else s.max_train_samples
    for name, limit in ((s.train_file, train_limit), (s.dev_file, s.max_eval_samples)):
        if not path_problem(name, expands=False) and (root / name).is_file():
            try:
                rows = len(read_split(root / name, labels, limit)["sentence"])
            except DataError as e:
                problems.append(f"data: {e.message}")
                continue
            if name == s.train_file and s.holdout_size:
                try:
                    check_holdout(rows, s.holdout_size)
                except DataError as e:
                    problems.append(f"data: {e.message}")
    return problems


def check_paths(cfg: RunConfig) -> list[str]:
    """Files and directories a valid config names (data, labels, model, tokenizer), max_length, and the trackers'
    packages."""
    return path_problems(Sources.of(cfg))


def check_raw_paths(data: dict[str, Any]) -> list[str]:
    """check_paths for a merged config whose schema fails: the paths it names are still checked, so a bad value
    elsewhere does not hide a missing file."""
    return path_problems(Sources.raw(data))


def check_pretrain_paths(cfg: PretrainConfig) -> list[str]:
    """The files a valid pretrain config names: its text (a text file, or the task's training file) and the model."""
    problems = []
    d = cfg.data
    if d.text_file is not None and (where := expand_path(d.text_file)) is not None and not where.is_file():
        problems.append(f"data.text_file: file not found: {d.text_file}{_where(where)}")
    if d.path is not None and (root := expand_path(d.path.replace("{task}", str(cfg.task)))) is not None:
        if not root.is_dir():
            problems.append(f"data.path: directory not found: {root}{_where(root)}")
        elif not (root / d.train_file).is_file():
            problems.append(f"data.train_file: file not found: {root / d.train_file}")
    m = cfg.model
    model_only = Sources(
        None, None, "", "", None, None, m.name_or_path, m.tokenizer, cfg.max_length, m.init == "pretrained"
    )
    return problems + path_problems(model_only)


def check_data(cfg: RunConfig) -> list[str]:
    """What is wrong inside the local data files a valid config uses (empty: nothing, or not local)."""
    return data_problems(Sources.of(cfg))
