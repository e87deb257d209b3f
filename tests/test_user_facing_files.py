"""What a user's clone holds must make sense without the development machines' `../shared` folder (data, docs)."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import REPO

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
