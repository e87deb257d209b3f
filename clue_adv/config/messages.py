"""Error messages about config fields: one readable line per validation problem (the dotted path the user wrote,
the value, a "did you mean"), and the check of a dotted `--set` key against the schema."""

from __future__ import annotations

import difflib
import typing
from typing import Any, get_args

from pydantic import BaseModel, ValidationError

from clue_adv.config.schema import RunConfig
from clue_adv.regularizers import registry
from clue_adv.schema import StrictModel


def did_you_mean(word: str, names: list[str]) -> str:
    """A hint for a misspelt field or parameter: the closest of `names`, else all of them (nothing without names)."""
    close = difflib.get_close_matches(word, names, n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (valid: {', '.join(names)})" if names else ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def check_key(root: type[BaseModel], key: str) -> str | None:
    """None if `key` (dotted, as in `--set`) names a field of `root`, else a message with a 'did you mean'."""
    model: type[BaseModel] | None = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        if model is None:
            return f"'{'.'.join(parts[:i])}' is not a block of fields"
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i])
            return f"unknown field '{part}'" + (f" in '{where}'" if where else "") + did_you_mean(part, list(fields))
        model = _model_of(fields[part].annotation)
    return None


def _is_union_tag(loc: tuple[Any, ...], i: int) -> bool:
    """Whether `loc[i]` is the tag pydantic puts into the path of a strategy block: `strategy.<tag>.epsilon` in a
    run config, `strategies.<n>.<tag>.epsilon` in a sweep file. Users wrote no such level."""
    if i == 0 or loc[i] not in registry():
        return False
    return loc[i - 1] == "strategy" or (i > 1 and isinstance(loc[i - 1], int) and loc[i - 2] == "strategies")


def _field_names(root: type[StrictModel], loc: tuple[Any, ...]) -> list[str]:
    """Names valid at `loc`'s parent, for 'did you mean' hints."""
    model: type[StrictModel] | None = root
    for i, part in enumerate(loc[:-1]):
        if _is_union_tag(loc, i):
            model = registry()[part].config_class
            continue
        field = model.model_fields.get(str(part)) if model is not None else None
        ann = field.annotation if field is not None else None
        # an optional block (`X | None`, e.g. eval.early_stopping) names X's fields
        candidates = [ann, *typing.get_args(ann)]
        model = next((a for a in candidates if isinstance(a, type) and issubclass(a, StrictModel)), None)
    return list(model.model_fields) if model is not None else []


def format_validation_errors(err: ValidationError, root: type[StrictModel] = RunConfig) -> list[str]:
    """One readable line per problem: dotted field path, message, the offending value, a hint."""
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        bad_key = loc[-1:] == ("[key]",)  # a mapping's key failed (e.g. a sweep's `overrides` key): the path names it
        # pydantic puts the union tag into the path; drop it so users see the YAML path they wrote.
        shown = [str(p) for i, p in enumerate(loc[:-1] if bad_key else loc) if not _is_union_tag(loc, i)]
        path = ".".join(shown) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            problems.append(f"{path}: unknown field{did_you_mean(str(loc[-1]), _field_names(root, loc))}")
        elif kind == "union_tag_invalid":
            tag = e.get("ctx", {}).get("tag")
            problems.append(f"{path}.name: unknown strategy {tag!r}; valid: {', '.join(registry())}")
        elif kind == "union_tag_not_found":
            problems.append(f"{path}.name: missing; valid: {', '.join(registry())}")
        elif kind == "literal_error":
            problems.append(f"{path}: {e['msg']} (got {e.get('input')!r})")
        elif kind == "missing":
            problems.append(f"{path}: required field is missing")
        elif kind == "value_error" and not shown:
            # A whole-config check (model_validator) names its fields at the start of its own message.
            problems.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            got = e.get("input")
            shown_input = "" if bad_key or isinstance(got, dict) or repr(got) in str(e["msg"]) else f" (got {got!r})"
            message = str(e["msg"]).removeprefix("Value error, ")  # pydantic's prefix for our own ValueErrors
            problems.append(f"{path}: {message}{shown_input}")
    return problems
