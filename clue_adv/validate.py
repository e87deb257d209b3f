"""`clue-adv validate`: schema errors plus the checks that need the filesystem, all reported at once,
before any training starts or any directory is created."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clue_adv.config import (
    TASKS,
    DataConfig,
    RunConfig,
    apply_override,
    expand_path,
    load_yaml,
    merge,
    parse_config,
    path_problem,
)
from clue_adv.errors import ClueAdvError
from clue_adv.model import check_safetensors, looks_local, model_max_positions


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
    pretrained: bool = True
    holdout_size: int = 0  # model.init: pretrained (its weights must be there), or random (config only)

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
            cfg.model.init == "pretrained",
            d.holdout_size,
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
        )

    def local_dir(self) -> Path | None:
        if self.data_path is None:
            return None
        return expand_path(self.data_path.replace("{task}", self.task or "{task}"))


def _where(expanded: Path) -> str:
    """A relative path is resolved from the current directory, not the config's: say which, since shipped configs
    name paths relative to the repository root. (`~` paths are absolute once expanded.)"""
    return "" if expanded.is_absolute() else f" (relative to the current directory {Path.cwd()})"


def _path_problems(s: _Sources) -> list[str]:
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
    return problems


def _hub_position_check(s: _Sources) -> tuple[list[str], list[str]]:
    """max_length against a hub model's positions, from the HF cache only (validate never uses the network).
    Returns (problems, notes): a model whose config is not cached gets a note, so the gap is visible."""
    if not s.model or looks_local(s.model) or s.max_length is None:
        return [], []
    from transformers import AutoConfig

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


def _data_problems(s: _Sources) -> list[str]:
    """Contents of the local data, read the way training reads it (same records, same limits) but not
    tokenized: labels.json's size, then each split's first problem (bad line, unknown label, no records)."""
    from clue_adv.data import check_holdout, read_labels, read_split
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
    """Files and directories a valid config names (data, labels, model, tokenizer), and max_length."""
    return _path_problems(_Sources.of(cfg))


def check_raw_paths(data: dict[str, Any]) -> list[str]:
    """check_paths for a merged config whose schema fails: the paths it names are still checked, so a bad value
    elsewhere does not hide a missing file."""
    return _path_problems(_Sources.raw(data))


def check_data(cfg: RunConfig) -> list[str]:
    """What is wrong inside the local data files a valid config uses (empty: nothing, or not local)."""
    return _data_problems(_Sources.of(cfg))


SWEEP_ONLY_FIELDS = {"base", "seeds", "strategies", "grid", "per_task", "tasks", "overrides", "slurm"}


def _is_sweep(data: dict[str, Any]) -> bool:
    # Run configs reject these keys, so one of them at the top level means the file is a sweep.
    return bool(SWEEP_ONLY_FIELDS & set(data))


def _raw_sweep_problems(path: Path, data: dict[str, Any]) -> list[str]:
    """What can be checked from a sweep file's raw YAML when its schema fails (load_plan stops at the first
    stage that fails): base files exist, the experiment name is usable. Messages match load_plan's, so
    a problem both find is reported once."""
    problems = []
    base = data.get("base")
    for name in [base] if isinstance(base, str) else base if isinstance(base, list) else []:
        full = expand_path(path.parent / name) if isinstance(name, str) else None
        if isinstance(name, str) and (full is None or not full.is_file()):
            problems.append(
                f"{path}: base: run config not found: {full or path.parent / name} "
                "(paths are relative to the sweep file's directory)"
            )
    experiment = data.get("experiment")
    if experiment is not None:
        try:
            parse_config({"task": next(iter(TASKS)), "experiment": experiment})
        except ClueAdvError as e:
            problems += [p for p in e.problems if p.startswith("experiment")]
    return problems


def _beyond_the_sweep_schema(path: Path, raw: dict[str, Any], overrides: list[str]) -> list[str]:
    """When the sweep file's own schema fails, load_plan stops there; plan the sweep again without the top-level
    fields that failed, so the problems of the rest (strategy blocks, override keys, grid, cell values, paths)
    are reported in the same pass. Empty when the schema was not what failed, or too little remains to plan."""
    from pydantic import ValidationError

    from clue_adv.sweep import SweepConfig, plan_sweep

    try:
        SweepConfig.model_validate(raw)
        return []
    except ValidationError as e:
        failed = {err["loc"][0] for err in e.errors() if err["loc"]}
    if "base" in failed:  # nothing to plan the cells against
        return []
    try:
        rest = SweepConfig.model_validate({k: v for k, v in raw.items() if k not in failed})
        plan_sweep(rest, path, overrides=overrides)
    except ValidationError:  # what remains does not make a sweep either: the first report stands
        return []
    except ClueAdvError as e:
        # Without the failed experiment/output_dir the cells' directories are not theirs: no conflicts there.
        moved = bool(failed & {"experiment", "output_dir"})
        return [
            p
            for p in (e.problems or [e.message])
            if "run config not found" not in p and not (moved and "holds a run with a different config" in p)
        ]
    return []


def _validate_sweep(path: Path, merged: list[Path], overrides: list[str], notes: list[str] | None = None) -> list[str]:
    from clue_adv.sweep import load_plan

    if merged:
        return [f"--with {', '.join(map(str, merged))}: cannot merge over a sweep file (use the sweep's `base`)"]
    try:
        plan = load_plan(path, overrides=overrides)
    except ClueAdvError as e:
        problems = e.problems or [e.message]
        try:
            raw = load_yaml(path)
        except ClueAdvError:
            return problems
        extra = _raw_sweep_problems(path, raw) + _beyond_the_sweep_schema(path, raw, overrides)
        return list(dict.fromkeys(problems + extra))
    # load_plan has checked every cell's schema and paths; the data contents and hub models remain, once per
    # source.
    problems = []
    seen: set[_Sources] = set()
    for cell in plan.cells:
        sources = _Sources.of(cell.config)
        if sources not in seen:
            seen.add(sources)
            where = f"{cell.config.experiment}/{cell.config.task}"
            hub_problems, hub_notes = _hub_position_check(sources)
            problems += [f"{where}: {p}" for p in hub_problems + _data_problems(sources)]
            if notes is not None:
                notes += [n for n in hub_notes if n not in notes]
    return list(dict.fromkeys(problems))


def validate_file(
    path: Path | list[Path], overrides: list[str] | None = None, notes: list[str] | None = None
) -> list[str]:
    """Every problem of one config file, or of several merged, or of a sweep file and each of its cells
    (empty list: valid). Schema problems do not hide path or data problems in the same file. `notes`, when
    given, receives what could not be checked (not problems: the file may still be valid)."""
    files = [Path(p) for p in (path if isinstance(path, list) else [path])]
    data: dict[str, Any] = {}
    try:
        for i, f in enumerate(files):
            loaded = load_yaml(f)
            if i == 0 and _is_sweep(loaded):
                return _validate_sweep(f, files[1:], overrides or [], notes)
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
    hub_problems, hub_notes = _hub_position_check(sources)
    if notes is not None:
        notes += hub_notes
    return problems + _path_problems(sources) + hub_problems + _data_problems(sources)
