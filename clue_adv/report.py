"""`clue-adv report`: tables, CSVs and plots rebuilt from run directories alone.

It reads `config.yaml` and `summary.json` of every run directory under the results directory, so it
works on a partial sweep (cells show how many seeds completed, failed or are missing) and can be rerun
at any time. Where a sweep left its manifest (`<experiment>/sweep.json`, every cell it planned), planned
cells without a run directory show as "not started". One table per experiment: rows = strategies
(directory tags), columns = tasks; each cell is
mean ± std over seeds of the dev accuracy at the best epoch (a second table: at the final epoch), and
the difference to the baseline (`none`) over the seeds both completed, with a 95% CI and a paired
t-test, Holm-adjusted across the table (see clue_adv/stats.py).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clue_adv.errors import ClueAdvError
from clue_adv.rundir import (
    LOCK_NAME,
    SWEEP_MANIFEST,
    atomic_write_text,
    find_run_dirs,
    first_non_directory,
    read_config,
    read_summary,
    run_lock_held,
)
from clue_adv.stats import FEW_SEEDS, PairedTest, few_seeds_note, holm, paired_by_key, summarize

FORMATS = ("rich", "md", "csv", "json", "latex")
METRICS = {
    "best": ("best_dev_accuracy", "Dev accuracy at the best epoch (%)"),
    "final": ("final_dev_accuracy", "Dev accuracy at the final epoch (%)"),
}
TASK_ORDER = ("iflytek", "tnews")  # the study's column order
TASK_NAMES = {"iflytek": "IFLYTEK", "tnews": "TNEWS"}
BASELINE = "none"

# The study (Su Jianlin, 2020): bert-base-chinese, one run per cell, dev accuracy (%).
STUDY = {
    "none": {"iflytek": 60.29, "tnews": 56.58},
    "fgm": {"iflytek": 62.46, "tnews": 57.66},
    "gradient_penalty": {"iflytek": 62.31, "tnews": 57.81},
}
STUDY_LABELS = {"none": "baseline", "fgm": "FGM ε = 0.5", "gradient_penalty": "gradient penalty ε = 1"}
# The exact variant each study row was measured with: a run's strategy block must match all of it (a field
# its config lacks, written before the field existed, counts as the field's default). FGM's default is the
# usual PyTorch variant (per-example output, summed losses), which the study's Keras code is not.
STUDY_PARAMS: dict[str, dict[str, Any]] = {
    "none": {},
    "fgm": {
        "epsilon": 0.5,
        "norm": "l2",
        "target": "embedding_matrix",
        "combine": "adversarial_only",
        "epsilon_unit": "absolute",
    },
    "gradient_penalty": {"epsilon": 1.0, "mode": "exact", "target": "embedding_output"},
}
# The study's training protocol (configs/*/study-*.yaml, from its bert4keras scripts): its figures are the best dev
# epoch of 50 under these settings, so a run under another protocol (e.g. CLUE's 3 epochs) gets no study figure.
STUDY_PROTOCOL: dict[str, Any] = {
    "model.head": "cls",
    "epochs": 50,
    "max_length": 128,
    "batch_size": 32,
    "optim.lr": 2e-5,
    "optim.weight_decay": 0.0,
    "optim.schedule": "constant",
    "optim.warmup_ratio": 0.0,
}
CLUE_DEV_BERT_BASE = {"iflytek": 60.37, "tnews": 56.09}  # CLUE's published dev scores, BERT-base
CLUE_TEST_BERT_BASE = {"iflytek": 60.29, "tnews": 56.58}  # CLUE leaderboard test scores, BERT-base

REFERENCE_NOTE = (
    "The study's baseline figures (IFLYTEK 60.29, TNEWS 56.58) equal the CLUE leaderboard *test* scores of "
    "BERT-base; CLUE's published *dev* scores for BERT-base are IFLYTEK 60.37 and TNEWS 56.09. The study's FGM "
    "and gradient-penalty figures are single runs of its own scripts, which keep the best *dev* epoch, so its "
    "gains set a dev number against a test number. The tables here report dev accuracy: compare them with the "
    "dev row, and compare differences with differences."
)


# --------------------------------------------------------------------------------------------------
# Reading runs


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

    def metric(self, key: str) -> float | None:
        value = self.summary.get(key)
        return float(value) if isinstance(value, int | float) and self.status == "completed" else None


# A run whose process died (kill -9, a crashed machine) leaves its summary saying `running`. Its lock tells: a
# live training process holds it. summary.json does not record the host, and a run on another node (Slurm on a
# shared filesystem) may hold a lock this node cannot see, so a free lock alone is not proof: the run must also
# have written nothing for this long (a live run writes metrics every few log steps).
STALE_AFTER_S = 600.0


def last_update(directory: Path) -> float | None:
    """When the run last wrote its metrics or summary (a POSIX time), or None when it wrote neither."""
    times = [p.stat().st_mtime for p in (directory / "metrics.jsonl", directory / "summary.json") if p.is_file()]
    return max(times) if times else None


def stale_running(directory: Path, summary: dict[str, Any]) -> bool:
    """Whether a run whose summary says `running` was in fact left by a process that died: it was started by a
    version that locks (`.lock` exists), nothing holds the lock, and it has not written for STALE_AFTER_S."""
    if summary.get("status", "running") != "running" or not (directory / LOCK_NAME).is_file():
        return False
    updated = last_update(directory)
    if updated is None or time.time() - updated < STALE_AFTER_S:
        return False
    return not run_lock_held(directory)


STALE_NOTE = "its process stopped without finishing (killed or the machine went down): its lock is free"


# Summary fields the report computes with: a value of another type (a hand-edited or damaged file) is dropped,
# so the run shows as missing that number instead of breaking the report.
_NUMERIC_FIELDS = (
    "best_dev_accuracy",
    "final_dev_accuracy",
    "best_dev_macro_f1",
    "final_dev_macro_f1",
    "best_epoch",
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
    from clue_adv.config import parse_config

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
    return runs + planned_runs(root, {r.directory.resolve() for r in runs})


NOT_STARTED = "not started"
MANIFEST = SWEEP_MANIFEST  # written by `clue-adv sweep` (see sweep.write_manifests)


def _manifests(root: Path) -> list[Path]:
    """Sweep manifests that can list runs under `root`: inside it, or in the experiment folder above it
    (when `root` is a task, strategy or single run)."""
    found = [p for p in root.rglob(MANIFEST) if not any(part.startswith(".") for part in p.relative_to(root).parts)]
    found += [d / MANIFEST for d in list(root.parents)[:3] if (d / MANIFEST).is_file()]
    return sorted(set(found))


def planned_runs(root: Path, existing: set[Path]) -> list[RunRecord]:
    """Cells a sweep manifest lists under `root` that have no run directory yet: status 'not started'.
    An unreadable manifest or entry is skipped: the report is built from what can be read."""
    root = Path(root).resolve()
    out = []
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
                )
            except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int(Infinity)
                continue
            if directory in existing or not directory.is_relative_to(root) or not isinstance(config, dict):
                continue
            existing.add(directory)
            out.append(record)
    return out


# --------------------------------------------------------------------------------------------------
# Tables


@dataclass
class CellStats:
    """One strategy on one task in one experiment."""

    task: str
    tag: str
    strategy: str
    values: dict[str, dict[int, float]]  # metric -> seed -> accuracy (%) of completed runs
    failed: list[int] = field(default_factory=list)
    interrupted: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    not_started: list[int] = field(default_factory=list)  # planned by a sweep (its manifest), no run directory
    delta: dict[str, PairedTest] = field(default_factory=dict)
    paired_seeds: dict[str, list[int]] = field(default_factory=dict)
    p_holm: dict[str, float] = field(default_factory=dict)
    step_time_s: float = math.nan
    step_time_ratio: float = math.nan
    wall_time_s: float = math.nan
    peak_memory_mb: float = math.nan
    reference: float | None = None

    @property
    def completed(self) -> int:
        return len(self.values["best"])


@dataclass
class ExperimentTable:
    experiment: str
    tasks: list[str]
    tags: list[str]
    strategies: dict[str, str]  # tag -> strategy name
    baseline: str | None
    cells: dict[tuple[str, str], CellStats]
    runs: list[RunRecord]
    seeds: list[int]
    study_setting: bool

    def cell(self, task: str, tag: str) -> CellStats | None:
        return self.cells.get((task, tag))

    @property
    def has_reference(self) -> bool:
        return any(c.reference is not None for c in self.cells.values())


def _is_bundled_sample(path: Any) -> bool:
    """Whether `data.path` points into the package's bundled sample data (clue_adv/assets), which is a
    few hundred records, not CLUE. A relative path is judged both as written (its `clue_adv/assets`
    segment) and resolved from the current directory, since the run may have started elsewhere."""
    if path is None:
        return False
    from clue_adv.data import ASSETS

    text = str(path).replace("\\", "/")
    if "clue_adv/assets" in text:
        return True
    resolved = Path(text.replace("{task}", "x")).expanduser().resolve()
    return resolved.is_relative_to(ASSETS.resolve())


def _config_value(config: dict[str, Any], dotted: str) -> Any:
    """A run's value for a dotted field; one its config.yaml lacks (written before the field existed) reads as
    the field's current default."""
    from clue_adv.config import parse_config

    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            try:
                node = parse_config({"task": "tnews"}).resolved()  # defaults do not depend on the task
            except ClueAdvError:
                return None
            for k in dotted.split("."):
                node = node[k]
            return node
        node = node[key]
    return node


def _matches_study_setting(runs: Iterable[RunRecord]) -> bool:
    """BERT-base (bert-base-chinese, pretrained) on the full data under the study's protocol: the setting of the
    study's numbers."""
    for r in runs:
        model = r.config.get("model", {})
        data = r.config.get("data", {})
        if any(_config_value(r.config, key) != value for key, value in STUDY_PROTOCOL.items()):
            return False
        name = str(model.get("name_or_path", "")).rstrip("/").rsplit("/", 1)[-1]
        if name != "bert-base-chinese" or model.get("init") != "pretrained":
            return False
        if data.get("max_train_samples") is not None or data.get("max_eval_samples") is not None:
            return False
        if _is_bundled_sample(data.get("path")):
            return False
    return True


def _study_row(strategy: str, runs: list[RunRecord]) -> str | None:
    if strategy not in STUDY_PARAMS or not runs:
        return None
    from clue_adv.regularizers import registry

    defaults = registry()[strategy].config_class().model_dump()
    for r in runs:
        block = {**defaults, **r.config["strategy"]}
        if any(block.get(key) != value for key, value in STUDY_PARAMS[strategy].items()):
            return None
    return strategy


def _strategy_order() -> dict[str, int]:
    from clue_adv.regularizers import registry

    return {name: i for i, name in enumerate(registry())}


def _mean(values: Iterable[float | None]) -> float:
    xs = [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return sum(xs) / len(xs) if xs else math.nan


def build_tables(runs: list[RunRecord]) -> list[ExperimentTable]:
    order = _strategy_order()
    tables = []
    for experiment in sorted({r.experiment for r in runs}):
        exp_runs = [r for r in runs if r.experiment == experiment]
        tasks = sorted({r.task for r in exp_runs}, key=lambda t: (TASK_ORDER.index(t) if t in TASK_ORDER else 99, t))
        strategies = {r.tag: r.strategy for r in exp_runs}
        tags = sorted(strategies, key=lambda t: (t != BASELINE, order.get(strategies[t], len(order)), t))
        baseline = BASELINE if BASELINE in strategies else None
        seeds = sorted({r.seed for r in exp_runs})
        study_setting = _matches_study_setting(exp_runs)
        cells: dict[tuple[str, str], CellStats] = {}
        for task in tasks:
            for tag in tags:
                here = [r for r in exp_runs if r.task == task and r.tag == tag]
                cell = CellStats(task, tag, strategies[tag], {m: {} for m in METRICS})
                for r in sorted(here, key=lambda r: r.seed):
                    if r.status == "completed":
                        for m, (key, _) in METRICS.items():
                            value = r.metric(key)
                            if value is not None:
                                cell.values[m][r.seed] = 100 * value
                    elif r.status == NOT_STARTED:
                        cell.not_started.append(r.seed)
                    else:
                        getattr(cell, r.status if r.status in ("failed", "interrupted") else "running").append(r.seed)
                cell.missing = [s for s in seeds if s not in {r.seed for r in here}]
                done = [r for r in here if r.status == "completed"]
                cell.step_time_s = _mean(r.summary.get("mean_step_time_s") for r in done)
                cell.wall_time_s = _mean(r.summary.get("train_wall_time_s") for r in done)
                memory = [r.summary.get("peak_memory_mb") for r in done if r.summary.get("peak_memory_mb") is not None]
                cell.peak_memory_mb = max(memory) if memory else math.nan
                row = _study_row(cell.strategy, here) if study_setting else None
                if row is not None and task in STUDY[row]:
                    cell.reference = STUDY[row][task]
                if here:
                    cells[(task, tag)] = cell
        table = ExperimentTable(experiment, tasks, tags, strategies, baseline, cells, exp_runs, seeds, study_setting)
        _compare_to_baseline(table)
        tables.append(table)
    return tables


def _compare_to_baseline(table: ExperimentTable) -> None:
    if table.baseline is None:
        return
    for metric in METRICS:
        tested: list[CellStats] = []
        for (task, tag), cell in table.cells.items():
            base = table.cell(task, table.baseline)
            if tag == table.baseline or base is None:
                continue
            test, seeds = paired_by_key(cell.values[metric], base.values[metric])
            cell.delta[metric], cell.paired_seeds[metric] = test, seeds
            tested.append(cell)
        # One family per table and metric: every strategy × task comparison with the baseline.
        for cell, adjusted in zip(tested, holm([c.delta[metric].p for c in tested]), strict=True):
            cell.p_holm[metric] = adjusted
    for (task, _), cell in table.cells.items():
        base = table.cell(task, table.baseline)
        if base is not None and base.step_time_s > 0:
            cell.step_time_ratio = cell.step_time_s / base.step_time_s


# --------------------------------------------------------------------------------------------------
# Cell text


def _num(x: float, digits: int = 2, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _p(p: float) -> str:
    if not math.isfinite(p):
        return "p n/a"
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def accuracy_text(cell: CellStats | None, metric: str) -> str:
    if cell is None:
        return "missing"
    s = summarize(list(cell.values[metric].values()))
    notes = [f"{len(seeds)} {what}" for what, seeds in _problems(cell) if seeds]
    if s.n == 0:
        return "– (" + ", ".join(notes) + ")" if notes else "–"
    body = f"{s.mean:.2f} ± {_num(s.std)} (n={s.n}"
    return body + ("; " + ", ".join(notes) if notes else "") + ")"


def _problems(cell: CellStats) -> list[tuple[str, list[int]]]:
    return [
        ("failed", cell.failed),
        ("interrupted", cell.interrupted),
        ("running", cell.running),
        ("missing", cell.missing),
        (NOT_STARTED, cell.not_started),
    ]


def delta_text(cell: CellStats | None, metric: str, baseline: str | None) -> str:
    if cell is None or baseline is None:
        return ""
    if cell.tag == baseline:
        return "baseline"
    test = cell.delta.get(metric)
    if test is None or test.n == 0:
        return "no shared seeds"
    if test.n == 1:
        return f"{_num(test.mean_difference, sign=True)} (1 pair, no test)"
    if test.no_spread:
        return f"{_num(test.mean_difference, sign=True)} ({test.n} pairs, no spread, no test)"
    p = cell.p_holm.get(metric, math.nan)
    star = "*" if math.isfinite(p) and p < 0.05 else ""
    ci = f"[{_num(test.ci_low, sign=True)}, {_num(test.ci_high, sign=True)}]"
    return f"{_num(test.mean_difference, sign=True)} {ci} {_p(p)}{star}"


def table_rows(table: ExperimentTable, metric: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table as text."""
    header = ["strategy"]
    for task in table.tasks:
        name = TASK_NAMES.get(task, task)
        header.append(name)
        if table.baseline is not None:
            header.append(f"{name} Δ vs {table.baseline} [95% CI]")
        if table.has_reference and metric == "best":  # the study's figures are best-epoch ones
            header.append(f"{name} study (1 run, BERT-base)")
    rows = []
    for tag in table.tags:
        row = [tag]
        for task in table.tasks:
            cell = table.cell(task, tag)
            row.append(accuracy_text(cell, metric))
            if table.baseline is not None:
                row.append(delta_text(cell, metric, table.baseline))
            if table.has_reference and metric == "best":
                row.append(f"{cell.reference:.2f}" if cell is not None and cell.reference is not None else "")
        rows.append(row)
    return header, rows


def method_note(table: ExperimentTable, metric: str) -> str:
    n_tests = sum(1 for c in table.cells.values() if metric in c.delta and math.isfinite(c.delta[metric].p))
    text = "Cells: mean ± sample std over seeds (n = completed seeds), accuracy in %."
    if table.baseline is not None:
        text += (
            f" Δ: mean paired difference vs `{table.baseline}` in percentage points over the seeds both completed "
            f"(same seed = same initialisation and data order), 95% t-interval, paired t-test p-value "
            f"Holm-adjusted across the table's {n_tests} comparison(s); * marks adjusted p < 0.05."
        )
        pairs = [c.delta[metric].n for c in table.cells.values() if metric in c.delta and c.delta[metric].n >= 2]
        if pairs and min(pairs) < FEW_SEEDS:
            text += few_seeds_note(min(pairs))
    else:
        text += " No baseline (`none`) runs in this experiment, so no differences are tested."
    return text


# --------------------------------------------------------------------------------------------------
# Rendering


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(esc(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "{": r"\{",
    "}": r"\}",
    "$": r"\$",
    "&": r"\&",
    "#": r"\#",
    "%": r"\%",
    "_": r"\_",
    "^": r"\textasciicircum{}",
    "~": r"\textasciitilde{}",
    "±": r"$\pm$",
    "Δ": r"$\Delta$",
    "ε": r"$\varepsilon$",
    "σ": r"$\sigma$",
    "α": r"$\alpha$",
    "–": "--",
    "<": r"$<$",
    ">": r"$>$",
}


def _latex_escape(s: str) -> str:
    """One pass over the characters, so a replacement's own braces or backslashes are never escaped again."""
    return "".join(_LATEX_SPECIAL.get(c, c) for c in s)


def _latex(header: list[str], rows: list[list[str]], caption: str) -> str:
    cols = "l" + "r" * (len(header) - 1)
    lines = [
        r"\begin{table}[t]",
        r"\centering",
        r"\small",
        rf"\begin{{tabular}}{{{cols}}}",
        r"\toprule",
        " & ".join(_latex_escape(h) for h in header) + r" \\",
        r"\midrule",
    ]
    lines += [" & ".join(_latex_escape(c) for c in row) + r" \\" for row in rows]
    lines += [r"\bottomrule", r"\end{tabular}", rf"\caption{{{_latex_escape(caption)}}}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _csv(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def _finite(x: float | None) -> float | None:
    return x if isinstance(x, int | float) and math.isfinite(x) else None


def table_json(table: ExperimentTable, metric: str) -> dict[str, Any]:
    rows = []
    for tag in table.tags:
        for task in table.tasks:
            cell = table.cell(task, tag)
            if cell is None:
                rows.append({"strategy": tag, "task": task, "n": 0, "missing": True})
                continue
            s = summarize(list(cell.values[metric].values()))
            test = cell.delta.get(metric)
            row: dict[str, Any] = {
                "strategy": tag,
                "strategy_name": cell.strategy,
                "task": task,
                "n": s.n,
                "mean": _finite(s.mean),
                "std": _finite(s.std),
                "seeds": cell.values[metric],
                "failed": cell.failed,
                "interrupted": cell.interrupted,
                "running": cell.running,
                "missing": cell.missing,
                "not_started": cell.not_started,
            }
            if test is not None:
                row["delta"] = {
                    "mean": _finite(test.mean_difference),
                    "ci95": [_finite(test.ci_low), _finite(test.ci_high)],
                    "t": _finite(test.t),
                    "p": _finite(test.p),
                    "p_holm": _finite(cell.p_holm.get(metric, math.nan)),
                    "n_pairs": test.n,
                }
            if cell.reference is not None and metric == "best":
                row["study_reference"] = cell.reference
            rows.append(row)
    return {
        "experiment": table.experiment,
        "metric": METRICS[metric][0],
        "unit": "percent",
        "baseline": table.baseline,
        "rows": rows,
    }


def render(tables: list[ExperimentTable], fmt: str, metric: str = "best") -> str:
    """The main table(s) alone in `fmt` (md, csv, json or latex)."""
    if fmt == "json":
        return json.dumps([table_json(t, metric) for t in tables], indent=2, ensure_ascii=False) + "\n"
    parts = []
    for table in tables:
        header, rows = table_rows(table, metric)
        title = f"{table.experiment}: {METRICS[metric][1]}"
        if fmt == "md":
            parts.append(f"**{title}**\n\n" + _markdown(header, rows) + "\n" + method_note(table, metric) + "\n")
        elif fmt == "latex":
            parts.append(_latex(header, rows, f"{title}. {method_note(table, metric)}"))
        elif fmt == "csv":
            parts.append(_csv(["experiment", *header], [[table.experiment, *row] for row in rows]))
        else:
            raise ClueAdvError(f"--format: unknown format {fmt!r} (valid: {', '.join(FORMATS)})")
    # CSV: one block (with its own header) per experiment, since experiments can differ in their tasks.
    return "\n".join(parts)


def rich_table(table: ExperimentTable, metric: str = "best") -> Any:
    """The main table for a terminal: one column per task, each cell on up to three lines (accuracy,
    Δ vs baseline, the study's figure), so it fits an 80-column terminal."""
    from rich.table import Table

    caption = method_note(table, metric)
    reference = table.has_reference and metric == "best"
    if reference:
        caption += " study: the study's published figure (one run, BERT-base)."
    out = Table(
        title=f"{table.experiment}: {METRICS[metric][1]}", caption=caption, caption_justify="left", show_lines=True
    )
    out.add_column("strategy", overflow="fold")
    for task in table.tasks:
        out.add_column(TASK_NAMES.get(task, task), justify="right", overflow="fold")
    for tag in table.tags:
        row = [tag]
        for task in table.tasks:
            cell = table.cell(task, tag)
            lines = [accuracy_text(cell, metric)]
            delta = delta_text(cell, metric, table.baseline)
            if delta and delta != "baseline":
                lines.append(f"Δ {delta}")
            if reference and cell is not None and cell.reference is not None:
                lines.append(f"study: {cell.reference:.2f}")
            row.append("\n".join(lines))
        out.add_row(*row)
    return out


# --------------------------------------------------------------------------------------------------
# CSV files


RUN_COLUMNS = [
    "experiment",
    "task",
    "strategy",
    "strategy_tag",
    "seed",
    "status",
    "best_dev_accuracy",
    "best_epoch",
    "final_dev_accuracy",
    "best_dev_macro_f1",
    "final_dev_macro_f1",
    "epochs",
    "steps",
    "train_wall_time_s",
    "mean_step_time_s",
    "peak_memory_mb",
    "device",
    "precision",
    "error",
    "directory",
]


def runs_csv(runs: list[RunRecord]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, RUN_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for r in sorted(runs, key=lambda r: (r.experiment, r.task, r.tag, r.seed)):
        row = {k: r.summary.get(k) for k in RUN_COLUMNS}
        row.update(
            experiment=r.experiment,
            task=r.task,
            strategy=r.strategy,
            strategy_tag=r.tag,
            seed=r.seed,
            status=r.status,
            directory=str(r.directory),
        )
        writer.writerow(row)
    return buf.getvalue()


def _cell_number(x: float | None, digits: int = 4) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.{digits}f}".rstrip("0").rstrip(".")


def summary_csv(tables: list[ExperimentTable]) -> str:
    """One row per experiment × task × strategy; accuracies and differences in percent."""
    columns = ["experiment", "task", "strategy_tag", "strategy", "completed", "failed", "interrupted", "running"]
    columns += ["missing", "not_started"]
    for m in METRICS:
        columns += [f"{m}_mean_pct", f"{m}_std_pct", f"{m}_delta_pct", f"{m}_delta_ci_low", f"{m}_delta_ci_high"]
        columns += [f"{m}_n_pairs", f"{m}_p", f"{m}_p_holm"]
    columns += ["mean_step_time_s", "step_time_ratio", "train_wall_time_s", "peak_memory_mb", "study_reference_pct"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for table in tables:
        for tag in table.tags:
            for task in table.tasks:
                cell = table.cell(task, tag)
                if cell is None:
                    continue
                row: list[Any] = [table.experiment, task, tag, cell.strategy, cell.completed]
                row += [len(cell.failed), len(cell.interrupted), len(cell.running), len(cell.missing)]
                row += [len(cell.not_started)]
                for m in METRICS:
                    s = summarize(list(cell.values[m].values()))
                    test = cell.delta.get(m)
                    row += [_cell_number(s.mean), _cell_number(s.std)]
                    if test is None:
                        row += ["", "", "", "", "", ""]
                    else:
                        row += [_cell_number(test.mean_difference), _cell_number(test.ci_low)]
                        row += [_cell_number(test.ci_high), test.n, _cell_number(test.p, 6)]
                        row += [_cell_number(cell.p_holm.get(m, math.nan), 6)]
                row += [_cell_number(cell.step_time_s, 6), _cell_number(cell.step_time_ratio, 3)]
                row += [_cell_number(cell.wall_time_s, 1), _cell_number(cell.peak_memory_mb, 1)]
                row += ["" if cell.reference is None else cell.reference]
                writer.writerow(row)
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# report.md


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def cost_rows(table: ExperimentTable) -> tuple[list[str], list[list[str]]]:
    header = ["task", "strategy", "runs", "step time (ms)"]
    if table.baseline is not None:
        header.append(f"× {table.baseline}")
    header += ["train time per run", "peak memory (MB)"]
    rows = []
    for task in table.tasks:
        for tag in table.tags:
            cell = table.cell(task, tag)
            if cell is None:
                continue
            row = [TASK_NAMES.get(task, task), tag, str(cell.completed), _num(1000 * cell.step_time_s, 1)]
            if table.baseline is not None:
                row.append(_num(cell.step_time_ratio, 2))
            row += [_duration(cell.wall_time_s), _num(cell.peak_memory_mb, 0)]
            rows.append(row)
    return header, rows


def _setting(table: ExperimentTable) -> str:
    def values(getter: Any) -> str:
        found = sorted({str(getter(r)) for r in table.runs if r.status != NOT_STARTED})
        return ", ".join(found[:4]) + (f" (+{len(found) - 4} more)" if len(found) > 4 else "")

    model = values(lambda r: f"{r.config['model'].get('name_or_path')} ({r.config['model'].get('init')})")
    lines = [
        f"- model: {model}",
        f"- tasks: {', '.join(table.tasks)}; seeds: {', '.join(map(str, table.seeds))}",
        f"- epochs: {values(lambda r: r.config.get('epochs'))}; "
        f"batch size: {values(lambda r: r.config.get('batch_size'))}; "
        f"lr: {values(lambda r: r.config.get('optim', {}).get('lr'))}",
        f"- train examples: {values(lambda r: r.summary.get('train_examples', '?'))}; "
        f"dev examples: {values(lambda r: r.summary.get('dev_examples', '?'))}",
        f"- device: {values(lambda r: r.summary.get('device', '?'))}",
    ]
    return "\n".join(lines)


def _status_counts(runs: list[RunRecord]) -> str:
    counts: dict[str, int] = {}
    for r in runs:
        counts[r.status] = counts.get(r.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def reference_section(tables: list[ExperimentTable]) -> str:
    tasks = [t for t in TASK_ORDER if any(t in table.tasks for table in tables)] or list(TASK_ORDER)
    header = ["published (single run, BERT-base)", *(TASK_NAMES[t] for t in tasks)]
    rows = [
        ["study: baseline (= CLUE leaderboard test, BERT-base)", *(f"{STUDY['none'][t]:.2f}" for t in tasks)],
        ["CLUE published dev, BERT-base", *(f"{CLUE_DEV_BERT_BASE[t]:.2f}" for t in tasks)],
        ["study: FGM ε = 0.5 (embedding matrix)", *(f"{STUDY['fgm'][t]:.2f}" for t in tasks)],
        ["study: gradient penalty ε = 1", *(f"{STUDY['gradient_penalty'][t]:.2f}" for t in tasks)],
    ]
    matched = [t.experiment for t in tables if t.has_reference]
    where = (
        f"Experiment(s) {', '.join(f'`{m}`' for m in matched)} match that setting (pretrained bert-base-chinese, "
        "full data, the study's protocol of configs/*/study-*.yaml), so their best-epoch tables carry a study "
        "column, filled only for runs of the study's exact variant (FGM: ε = 0.5, L2, embedding matrix, "
        "adversarial loss only; gradient penalty: ε = 1, exact, embedding output)."
        if matched
        else "None of these runs matches that setting (pretrained bert-base-chinese on the full data under the "
        "study's protocol of configs/*/study-*.yaml: [CLS] head, 50 epochs, constant lr 2e-5, no weight decay), "
        "so the tables have no study column."
    )
    return "## Published reference\n\n" + _markdown(header, rows) + "\n" + REFERENCE_NOTE + " " + where + "\n"


@dataclass
class ReportResult:
    tables: list[ExperimentTable]
    runs: list[RunRecord]
    files: list[Path]
    skipped: list[str] = field(default_factory=list)  # run directories that could not be read


def build_report(
    results_dir: str | Path,
    output_dir: str | Path | None = None,
    *,
    plots: bool = True,
    experiments: Iterable[str] | None = None,
) -> ReportResult:
    """Read every run under `results_dir`, write report.md, runs.csv, summary.csv and plots/."""
    from clue_adv.config import require_nameable

    root = Path(results_dir)
    require_nameable(root, "results directory", expands=False)
    if not root.is_dir():
        raise ClueAdvError(f"results directory not found: {root}")
    skipped: list[str] = []
    runs = collect_runs(root, skipped)
    if experiments is not None:
        wanted = set(experiments)
        runs = [r for r in runs if r.experiment in wanted]
    if not runs:
        raise ClueAdvError(f"no run directories (with config.yaml) under {root}")
    out = Path(output_dir) if output_dir is not None else root
    if first_non_directory(out) is not None:
        raise ClueAdvError(f"report folder {out}: it, or a folder above it, is a file")
    tables = build_tables(runs)
    files = [out / "runs.csv", out / "summary.csv", out / "report.md"]
    atomic_write_text(files[0], runs_csv(runs))
    atomic_write_text(files[1], summary_csv(tables))

    figures: dict[str, list[tuple[str, Path]]] = {}
    if plots:
        from clue_adv.plots import experiment_plots

        for table in tables:
            figures[table.experiment] = experiment_plots(table, out / "plots")
            files += [p for _, p in figures[table.experiment]]

    parts = [f"# Results: `{root}`\n", f"{len(runs)} run(s): {_status_counts(runs)}.\n"]
    for table in tables:
        parts.append(f"## Experiment `{table.experiment}`\n\n{_setting(table)}\n")
        for metric in METRICS:
            header, rows = table_rows(table, metric)
            parts.append(f"### {METRICS[metric][1]}\n\n" + _markdown(header, rows) + "\n" + method_note(table, metric))
        header, rows = cost_rows(table)
        parts.append(
            "### Cost\n\n" + _markdown(header, rows) + "\nStep time: mean wall time per optimizer step (the first step "
            "excluded); × baseline: ratio of mean step times on the same task. Runs sharing a machine (parallel "
            "jobs) slow each other, so compare costs within one sweep. Peak memory: GPU allocations on CUDA; on CPU "
            "the peak resident memory of the run's process, largest over the seeds; – where no run measured it "
            "(in a one-job sweep, runs after the first share the process: their CPU peak is each run's own where "
            "Linux lets the peak be reset between runs, and not recorded elsewhere)."
        )
        if figures.get(table.experiment):
            images = [f"![{title}]({path.relative_to(out).as_posix()})" for title, path in figures[table.experiment]]
            parts.append("### Plots\n\n" + "\n\n".join(images))
        problems = [r for r in table.runs if r.status != "completed"]
        if problems:
            lines = [
                f"- `{r.task}/{r.tag}/seed-{r.seed}`: {r.status}"
                + (f" — {r.summary['error']}" if r.summary.get("error") else "")
                for r in sorted(problems, key=lambda r: (r.task, r.tag, r.seed))
            ]
            parts.append("### Runs that did not complete\n\n" + "\n".join(lines))
    parts.append(reference_section(tables))
    atomic_write_text(files[2], "\n\n".join(p.rstrip("\n") for p in parts) + "\n")
    return ReportResult(tables, runs, files, skipped)
