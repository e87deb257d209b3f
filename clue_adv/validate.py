"""`clue-adv validate`: schema errors plus the checks that need the filesystem, all reported at once,
before any training starts or any directory is created."""

from __future__ import annotations

from pathlib import Path

from clue_adv.config import RunConfig, load_config
from clue_adv.errors import ClueAdvError
from clue_adv.model import looks_local, model_max_positions


def check_paths(cfg: RunConfig) -> list[str]:
    problems = []
    if cfg.data.path is not None:
        root = cfg.data.local_dir(cfg.task)
        if not root.is_dir():
            problems.append(f"data.path: directory not found: {root}")
        else:
            for field, name in (
                ("labels", "labels.json"),
                ("train_file", cfg.data.train_file),
                ("dev_file", cfg.data.dev_file),
            ):
                if not (root / name).is_file():
                    problems.append(f"data.{field}: file not found: {root / name}")
    for field, name in (("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer)):
        if name and looks_local(name) and not Path(name).expanduser().is_dir():
            problems.append(f"{field}: directory not found: {name}")
    positions = model_max_positions(cfg.model.name_or_path) if looks_local(cfg.model.name_or_path) else None
    if positions is not None and cfg.max_length > positions:
        problems.append(f"max_length: {cfg.max_length} exceeds the model's {positions} positions")
    return problems


def validate_file(path: Path | list[Path], overrides: list[str] | None = None) -> list[str]:
    """Every problem of one config file, or of several merged (empty list: valid)."""
    try:
        cfg = load_config(path, overrides)
    except ClueAdvError as e:
        return e.problems or [e.message]
    return check_paths(cfg)
