"""Path fields of a config: names no file can have are refused when the config is read, before any
exists()/is_dir() would raise on them; an experiment name must be a plain directory name; a path written in a
config file is relative to that file (paths_from_file)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from clue_adv.errors import ConfigError

# The same pattern as StrategyConfig.tag: run directory names that are safe on every filesystem.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")

NAME_MAX = 255  # bytes per path component on Linux/macOS filesystems; a longer one makes every stat() raise


def path_problem(value: str, expands: bool = True) -> str | None:
    """Why `value` cannot name a file at all (a component over NAME_MAX bytes; with `expands`, a `~user` naming
    no user), or None. Either would make every later exists()/is_dir() raise instead of answering."""
    # surrogateescape: a name from argv may hold bytes that are not UTF-8 (a str of lone surrogates)
    if "\0" in value:
        return "contains a NUL byte"
    if any(len(part.encode("utf-8", "surrogateescape")) > NAME_MAX for part in value.split("/")):
        return f"a path component is longer than {NAME_MAX} bytes"
    if expands and value.startswith("~"):
        try:
            Path(value).expanduser()
        except RuntimeError:
            return f"{value.split('/', 1)[0]!r}: no such user (home directory unknown)"
    return None


def expand_path(value: str | Path) -> Path | None:
    """expanduser(), or None for a path no file can have (see path_problem): asking the filesystem about it
    would raise."""
    if path_problem(str(value)):
        return None
    return Path(value).expanduser()


def require_nameable(path: str | Path, what: str, expands: bool = True) -> None:
    """Raise a ConfigError naming `what` (e.g. `--output-dir`) when no file can have the name `path`."""
    if problem := path_problem(str(path), expands):
        shown = str(path) if len(str(path)) <= 80 else str(path)[:80] + "..."
        raise ConfigError(f"{what} {shown}: {problem}")


def directory_name(value: str) -> str:
    """An experiment name, which becomes a directory. Raises ValueError unless it is a plain name: a whitelist (the
    one strategy `tag` uses) keeps a run inside its output directory and rejects what a blacklist misses (NUL bytes,
    control characters, ':' on Windows)."""
    if len(value) > 80 or not _SAFE_NAME.fullmatch(value):
        raise ValueError(
            "must be a plain name of at most 80 characters: letters, digits and '_.=+-', "
            "starting with a letter or digit"
        )
    return value


def expandable(value: str | None) -> str | None:
    """A path field is refused here when no file could have its name (see path_problem)."""
    if value is not None and (problem := path_problem(value)):
        raise ValueError(problem)
    return value


# --------------------------------------------------------------------------------------------------
# Paths written in a config file are relative to that file

# Fields that name something to read (the run config's and the pretrain config's). Written in a config file, a
# relative one is relative to that file's folder, wherever the command runs; on the command line (`--set`) it is
# relative to the current directory. Where a run writes (`output_dir`, `-o`) is relative to the current directory.
INPUT_PATH_FIELDS = ("data.path", "data.text_file", "model.name_or_path", "model.tokenizer")
# Fields that hold a hub id (`bert-base-chinese`, `org/name`) or a local directory.
_HUB_ID_OR_PATH = ("model.name_or_path", "model.tokenizer")


def names_a_path(value: str) -> bool:
    """Whether a model or tokenizer name is written as a path rather than a hub id: it starts with `.`, `/` or `~`,
    or has more than one `/` (a hub id is `name` or `org/name`)."""
    return value.startswith((".", "/", "~")) or value.count("/") > 1


def from_folder(folder: Path, value: str) -> str:
    """`value`, a path written in a config file in `folder`, as the command sees it: relative to the current directory
    when it lies under it (`configs/../clue_adv/assets/tokenizer` -> `clue_adv/assets/tokenizer`, what runs recorded
    before paths were relative to their file), else absolute; so the same file reaches the same form however the
    config was named. Absolute and `~` paths are unchanged."""
    if not value or value.startswith("~") or os.path.isabs(value):
        return value
    # abspath is lexical: `a/b/..` is `a` even when b is a symbolic link elsewhere (as a shell's `cd` reads it)
    absolute = os.path.abspath(os.path.join(folder, value))
    relative = os.path.relpath(absolute, os.getcwd())
    if relative == os.pardir or relative.startswith(os.pardir + os.sep):
        return absolute
    # a path under a folder literally named `~x` is not x's home: expanduser() must not read it so
    return f"./{relative}" if relative.startswith("~") else relative


def same_place(value: str) -> str:
    """A local path as an absolute one (from the current directory), to compare two spellings of it; anything else
    (a hub id) unchanged."""
    if path_problem(value) or not (names_a_path(value) or os.path.isdir(value)):
        return value
    return os.path.abspath(os.path.expanduser(value))


def paths_from_file(data: dict[str, Any], folder: Path, prefix: str = "") -> dict[str, Any]:
    """`data` (a config file's fields; or a sweep file's `overrides`, `per_task` block or `grid`, whose keys may be
    dotted) with every input path (INPUT_PATH_FIELDS) it names resolved from `folder`, the file's folder. A model
    or tokenizer name counts as a path when it is written as one (names_a_path) or names a directory there; else
    it is a hub id and stays as it is."""
    out = dict(data)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in INPUT_PATH_FIELDS:
            out[key] = _resolved(full, value, folder)
        elif isinstance(value, dict) and any(f.startswith(f"{full}.") for f in INPUT_PATH_FIELDS):
            out[key] = paths_from_file(value, folder, f"{full}.")
    return out


def _resolved(field: str, value: Any, folder: Path) -> Any:
    if isinstance(value, list):  # a sweep's grid lists the values
        return [_resolved(field, v, folder) for v in value]
    if not isinstance(value, str) or path_problem(value):  # the schema names what is wrong with it
        return value
    if field in _HUB_ID_OR_PATH and not (names_a_path(value) or (folder / value).is_dir()):
        return value
    return from_folder(folder, value)
