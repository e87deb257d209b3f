"""The report's input: every run directory under a results folder (its config.yaml and summary.json), and the
cells a sweep planned there (its manifest) that have no directory yet."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clue_adv.config import parse_config
from clue_adv.errors import ClueAdvError
from clue_adv.rundir import (
    SWEEP_MANIFEST,
    find_run_dirs,
    manifest_invocations,
    read_config,
    read_summary,
    stale_running,
)

NOT_STARTED = "not started"
MANIFEST = SWEEP_MANIFEST  # written by `clue-adv sweep` (see sweep.write_manifests)


@dataclass
class RunRecord:
    directory: Path
    experiment: str
    task: str
    strategy: str
    tag: str
    seed: int
    status: str  # completed | failed | interrupted | running | not started (planned by a sweep, no run directory)
    config: dict[str, Any]
    summary: dict[str, Any]
    # Position of the run's cell in its experiment's sweep manifest (None: no sweep planned it). The report lists
    # strategies in the order the sweep files name them, which is the order their authors chose to read them in.
    plan_index: int | None = None

    def metric(self, key: str) -> float | None:
        value = self.summary.get(key)
        return float(value) if isinstance(value, int | float) and self.status == "completed" else None

    def diagnostic(self, model: str, key: str) -> float | None:
        """A completed run's diagnostic `key` (a `diag/...` name) of its `best` or `final` model; None when the run
        recorded none (diagnostics off, a run from before them) or the value is not a finite number."""
        block = self.summary.get("diagnostics") if self.status == "completed" else None
        results = block.get(model) if isinstance(block, dict) else None
        value = results.get(key) if isinstance(results, dict) else None
        return float(value) if _finite_number(value) else None

    def diagnostic_names(self, model: str) -> list[str]:
        """The `diag/...` names this run recorded a number for, for its `best` or `final` model (none: empty)."""
        block = self.summary.get("diagnostics") if self.status == "completed" else None
        results = block.get(model) if isinstance(block, dict) else None
        if not isinstance(results, dict):
            return []
        return [k for k, v in results.items() if isinstance(k, str) and k.startswith("diag/") and _finite_number(v)]

    @property
    def early_stopping(self) -> dict[str, Any] | None:
        """The run's `eval.early_stopping` block (None: it trained every epoch)."""
        block = (self.config.get("eval") or {}).get("early_stopping")
        return block if isinstance(block, dict) else None


# Summary fields the report computes with: a value of another type (a hand-edited or damaged file) is dropped,
# so the run shows as missing that number instead of breaking the report.
_NUMERIC_FIELDS = (
    "best_dev_accuracy",
    "final_dev_accuracy",
    "best_dev_macro_f1",
    "final_dev_macro_f1",
    "best_epoch",
    "best_step",
    "stopped_early_at_epoch",
    "stopped_early_at_step",
    "steps",
    "mean_step_time_s",
    "train_wall_time_s",
    "samples_per_s",
    "peak_memory_mb",
)


def _finite_number(value: Any) -> bool:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an integer beyond any float
        return False


def _clean_summary(summary: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in summary.items() if k not in _NUMERIC_FIELDS or _finite_number(v)}
    history = out.get("dev_history")
    if history is not None and not (
        isinstance(history, list)
        and all(
            isinstance(h, dict) and all(_finite_number(h.get(k)) for k in ("epoch", "step", "accuracy"))
            for h in history
        )
    ):
        del out["dev_history"]
    return out


def collect_runs(root: Path, skipped: list[str] | None = None) -> list[RunRecord]:
    """Every run under `root` whose config.yaml reads as a run config (others are named in `skipped`), with
    summary fields of the wrong type dropped; then the cells a sweep planned that have no directory yet."""
    runs = []
    for directory in find_run_dirs(root):
        raw = read_config(directory)
        try:
            config = parse_config(raw or {}, source=str(directory / "config.yaml")).resolved()
        except ClueAdvError as e:
            if skipped is not None:
                skipped.append(f"{directory}: config.yaml is not a run config ({(e.problems or [e.message])[0]})")
            continue
        summary = _clean_summary(read_summary(directory) or {})
        runs.append(
            RunRecord(
                directory=directory,
                experiment=str(config.get("experiment", directory.parents[2].name)),
                task=str(config.get("task", directory.parents[1].name)),
                strategy=str(config["strategy"].get("name", "?")),
                tag=directory.parent.name,
                seed=int(config.get("seed", -1)),
                status="interrupted" if stale_running(directory, summary) else str(summary.get("status", "running")),
                config=config,
                summary=summary,
            )
        )
    found = {r.directory.resolve(): r for r in runs}
    planned = planned_runs(root, set())
    for cell in planned:
        if cell.directory in found:
            found[cell.directory].plan_index = cell.plan_index
    return runs + [cell for cell in planned if cell.directory not in found]


def _manifests(root: Path) -> list[Path]:
    """Sweep manifests that can list runs under `root`: inside it, or in the experiment folder above it
    (when `root` is a task, strategy or single run)."""
    found = [p for p in root.rglob(MANIFEST) if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    found += [d / MANIFEST for d in list(root.parents)[:3] if (d / MANIFEST).is_file()]
    return sorted(set(found))


def sweep_invocations(root: Path) -> dict[str, list[dict[str, Any]]]:
    """Per experiment, the sweep commands its manifest recorded (`clue-adv sweep` appends one per start, with its
    date, machine and --jobs), oldest first; a manifest from before they were recorded gives its sweep file alone.
    Unreadable manifests are skipped."""
    found: dict[str, list[dict[str, Any]]] = {}
    for manifest in _manifests(Path(root).resolve()):
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            experiment = str(data["experiment"])
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            continue
        found.setdefault(experiment, []).extend(manifest_invocations(data))
    return found


def planned_runs(root: Path, existing: set[Path]) -> list[RunRecord]:
    """Cells a sweep manifest lists under `root` whose directory is not in `existing` (pass the run directories
    found, to get the cells not started yet), as status 'not started', each with its position in the plan.
    An unreadable manifest or entry is skipped: the report is built from what can be read."""
    root = Path(root).resolve()
    out: list[RunRecord] = []
    for manifest in _manifests(root):
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
            entries = data["cells"]
            experiment = str(data["experiment"])
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            continue
        for entry in entries if isinstance(entries, list) else []:
            try:
                directory = (manifest.parent / entry["run_dir"]).resolve()
                config = entry["identity"]
                record = RunRecord(
                    directory=directory,
                    experiment=experiment,
                    task=str(entry["task"]),
                    strategy=str(entry["strategy"]),
                    tag=str(entry["strategy_tag"]),
                    seed=int(entry["seed"]),
                    status=NOT_STARTED,
                    config=config,
                    summary={},
                    plan_index=len(out),
                )
            except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int(Infinity)
                continue
            if directory in existing or not directory.is_relative_to(root) or not isinstance(config, dict):
                continue
            existing.add(directory)
            out.append(record)
    return out
