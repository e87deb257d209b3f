"""Path fields of a config: names no file can have are refused when the config is read, before any
exists()/is_dir() would raise on them; an experiment name must be a plain directory name."""

from __future__ import annotations

import re
from pathlib import Path

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
