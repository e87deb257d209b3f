"""`clue-adv validate`: schema errors plus the checks that need the filesystem, all reported at once,
before any training starts or any directory is created."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clue_adv.config import TASKS, DataConfig, RunConfig, apply_override, load_yaml, merge, parse_config
from clue_adv.errors import ClueAdvError
from clue_adv.model import looks_local, model_max_positions


@dataclass(frozen=True)
class _Sources:
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

    @classmethod
    def of(cls, cfg: RunConfig) -> _Sources:
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
        )

    @classmethod
    def raw(cls, data: dict[str, Any]) -> _Sources:
        def block(name: str) -> dict[str, Any]:
            value = data.get(name)
            return value if isinstance(value, dict) else {}

        def text(d: dict[str, Any], key: str, default: str | None = None) -> str | None:
            return d[key] if isinstance(d.get(key), str) else default

        def positive(d: dict[str, Any], key: str) -> int | None:
            value = d.get(key)
            return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

        d, m = block("data"), block("model")
        defaults = DataConfig.model_fields
        task = data.get("task")
        return cls(
            task if task in TASKS else None,
            text(d, "path"),
            text(d, "train_file", defaults["train_file"].default) or "train.json",
            text(d, "dev_file", defaults["dev_file"].default) or "dev.json",
            positive(d, "max_train_samples"),
            positive(d, "max_eval_samples"),
            text(m, "name_or_path"),
            text(m, "tokenizer"),
            positive(data, "max_length"),
        )

    def local_dir(self) -> Path | None:
        if self.data_path is None:
            return None
        return Path(self.data_path.replace("{task}", self.task or "{task}")).expanduser()


def _path_problems(s: _Sources) -> list[str]:
    problems = []
    root = s.local_dir()
    if root is not None and (s.task is not None or "{task}" not in (s.data_path or "")):
        if not root.is_dir():
            problems.append(f"data.path: directory not found: {root}")
        else:
            for field, name in (("labels", "labels.json"), ("train_file", s.train_file), ("dev_file", s.dev_file)):
                if not (root / name).is_file():
                    problems.append(f"data.{field}: file not found: {root / name}")
    for field, name in (("model.name_or_path", s.model), ("model.tokenizer", s.tokenizer)):
        if name and looks_local(name) and not Path(name).expanduser().is_dir():
            problems.append(f"{field}: directory not found: {name}")
    positions = model_max_positions(s.model) if s.model and looks_local(s.model) else None
    if positions is not None and s.max_length is not None and s.max_length > positions:
        problems.append(f"max_length: {s.max_length} exceeds the model's {positions} positions")
    return problems


def _data_problems(s: _Sources) -> list[str]:
    """Contents of the local data, read the way training reads it (same records, same limits) but not
    tokenized: labels.json's size, then each split's first problem (bad line, unknown label, no records)."""
    from clue_adv.data import read_labels, read_split
    from clue_adv.errors import DataError

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
    for name, limit in ((s.train_file, s.max_train_samples), (s.dev_file, s.max_eval_samples)):
        if (root / name).is_file():
            try:
                read_split(root / name, labels, limit)
            except DataError as e:
                problems.append(f"data: {e.message}")
    return problems


def check_paths(cfg: RunConfig) -> list[str]:
    """Files and directories a valid config names (data, labels, model, tokenizer), and max_length."""
    return _path_problems(_Sources.of(cfg))


def check_data(cfg: RunConfig) -> list[str]:
    """What is wrong inside the local data files a valid config uses (empty: nothing, or not local)."""
    return _data_problems(_Sources.of(cfg))


SWEEP_ONLY_FIELDS = {"base", "seeds", "strategies", "grid", "per_task", "tasks", "overrides", "slurm"}


def _is_sweep(data: dict[str, Any]) -> bool:
    # Run configs reject these keys, so one of them at the top level means the file is a sweep.
    return bool(SWEEP_ONLY_FIELDS & set(data))


def _validate_sweep(path: Path, merged: list[Path], overrides: list[str]) -> list[str]:
    from clue_adv.sweep import load_plan

    if merged:
        return [f"--with {', '.join(map(str, merged))}: cannot merge over a sweep file (use the sweep's `base`)"]
    try:
        plan = load_plan(path, overrides=overrides)
    except ClueAdvError as e:
        return e.problems or [e.message]
    # load_plan has checked every cell's schema and paths; the data contents remain, once per data source.
    problems: list[str] = []
    seen: set[_Sources] = set()
    for cell in plan.cells:
        sources = _Sources.of(cell.config)
        if sources not in seen:
            seen.add(sources)
            problems += [f"{cell.config.experiment}/{cell.config.task}: {p}" for p in _data_problems(sources)]
    return list(dict.fromkeys(problems))


def validate_file(path: Path | list[Path], overrides: list[str] | None = None) -> list[str]:
    """Every problem of one config file, or of several merged, or of a sweep file and each of its cells
    (empty list: valid). Schema problems do not hide path or data problems in the same file."""
    files = [Path(p) for p in (path if isinstance(path, list) else [path])]
    data: dict[str, Any] = {}
    try:
        for i, f in enumerate(files):
            loaded = load_yaml(f)
            if i == 0 and _is_sweep(loaded):
                return _validate_sweep(f, files[1:], overrides or [])
            data = merge(data, loaded)
        for assignment in overrides or []:
            apply_override(data, assignment)
    except ClueAdvError as e:
        return e.problems or [e.message]
    try:
        sources = _Sources.of(parse_config(data, source=" + ".join(map(str, files))))
        problems: list[str] = []
    except ClueAdvError as e:
        sources = _Sources.raw(data)
        problems = e.problems or [e.message]
    path_problems = _path_problems(sources)
    return problems + path_problems + _data_problems(sources)
