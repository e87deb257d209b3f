"""The report's tables: per experiment, one cell per task and strategy (directory tag) with the seeds' accuracies,
the paired comparison with the baseline (clue_adv/stats.py) and the cost; and each cell as text."""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clue_adv.progress import long_duration
from clue_adv.regularizers import registry
from clue_adv.report.collect import NOT_STARTED, RunRecord
from clue_adv.report.study import STUDY, matches_study_setting, study_row
from clue_adv.stats import FEW_SEEDS, PairedTest, few_seeds_note, holm, paired_by_key, summarize

METRICS = {
    "best": ("best_dev_accuracy", "Dev accuracy at the best epoch (%)"),
    "final": ("final_dev_accuracy", "Dev accuracy at the final epoch (%)"),
}
TASK_ORDER = ("iflytek", "tnews")  # the study's column order
TASK_NAMES = {"iflytek": "IFLYTEK", "tnews": "TNEWS"}
BASELINE = "none"


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
    # The dev peak of each completed run (report/peak.py): epoch of the best dev accuracy, best − final dev
    # accuracy in points, and the number of epochs evaluated.
    best_epochs: list[int] = field(default_factory=list)
    best_minus_final: list[float] = field(default_factory=list)
    epochs_trained: list[int] = field(default_factory=list)

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


def _strategy_order() -> dict[str, int]:
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
        # Baseline first, then the sweep files' order; strategies no sweep planned follow in registry order.
        planned_at: dict[str, int] = {}
        for r in exp_runs:
            if r.plan_index is not None:
                planned_at[r.tag] = min(planned_at.get(r.tag, r.plan_index), r.plan_index)
        tags = sorted(
            strategies,
            key=lambda t: (t != BASELINE, planned_at.get(t, math.inf), order.get(strategies[t], len(order)), t),
        )
        baseline = BASELINE if BASELINE in strategies else None
        seeds = sorted({r.seed for r in exp_runs})
        study_setting = matches_study_setting(exp_runs)
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
                cell.best_epochs = [int(e) for r in done if (e := r.metric("best_epoch")) is not None]
                ends = [(r.metric("best_dev_accuracy"), r.metric("final_dev_accuracy")) for r in done]
                cell.best_minus_final = [100 * (b - f) for b, f in ends if b is not None and f is not None]
                cell.epochs_trained = sorted({len(r.summary.get("dev_history") or []) for r in done} - {0})
                row = study_row(cell.strategy, here) if study_setting else None
                if row is not None and task in STUDY[row]:
                    cell.reference = STUDY[row][task]
                if here:
                    cells[(task, tag)] = cell
        table = ExperimentTable(experiment, tasks, tags, strategies, baseline, cells, exp_runs, seeds, study_setting)
        _compare_to_baseline(table)
        tables.append(table)
    return tables


@dataclass(frozen=True)
class Comparison:
    """One paired comparison with the baseline: the test, the seeds it paired and its Holm-adjusted p-value."""

    test: PairedTest
    seeds: list[int]
    p_holm: float


def compare_family(pairs: Mapping[Hashable, tuple[Mapping[int, float], Mapping[int, float]]]) -> dict[Any, Comparison]:
    """Each (treatment, baseline) pair of {seed: value} maps tested on the seeds both have (paired t-test), the
    p-values Holm-adjusted across the family: the accuracy tables and the diagnostics tables test this way."""
    tests = {key: paired_by_key(treatment, base) for key, (treatment, base) in pairs.items()}
    adjusted = holm([test.p for test, _ in tests.values()])
    return {key: Comparison(test, seeds, p) for (key, (test, seeds)), p in zip(tests.items(), adjusted, strict=True)}


def _compare_to_baseline(table: ExperimentTable) -> None:
    if table.baseline is None:
        return
    for metric in METRICS:
        pairs = {}
        for (task, tag), cell in table.cells.items():
            base = table.cell(task, table.baseline)
            if tag != table.baseline and base is not None:
                pairs[(task, tag)] = (cell.values[metric], base.values[metric])
        # One family per table and metric: every strategy × task comparison with the baseline.
        for key, comparison in compare_family(pairs).items():
            cell = table.cells[key]
            cell.delta[metric], cell.paired_seeds[metric] = comparison.test, comparison.seeds
            cell.p_holm[metric] = comparison.p_holm
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
    return paired_text(cell.delta.get(metric), cell.p_holm.get(metric, math.nan))


def paired_text(test: PairedTest | None, p_holm: float, digits: int = 2) -> str:
    """A paired difference as a table shows it: mean [95% CI] Holm-adjusted p (* below 0.05), or why there is no
    test; `digits` after the decimal point."""
    if test is None or test.n == 0:
        return "no shared seeds"
    mean = _num(test.mean_difference, digits, sign=True)
    if test.n == 1:
        return f"{mean} (1 pair, no test)"
    if test.no_spread:
        return f"{mean} ({test.n} pairs, no spread, no test)"
    star = "*" if math.isfinite(p_holm) and p_holm < 0.05 else ""
    ci = f"[{_num(test.ci_low, digits, sign=True)}, {_num(test.ci_high, digits, sign=True)}]"
    return f"{mean} {ci} {_p(p_holm)}{star}"


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
            + (
                f"Holm-adjusted across the table's {n_tests} comparison{'s' if n_tests > 1 else ''}; * marks adjusted "
                "p < 0.05."
                if n_tests
                else "where a strategy and the baseline share at least two completed seeds (none here yet)."
            )
        )
        pairs = [c.delta[metric].n for c in table.cells.values() if metric in c.delta and c.delta[metric].n >= 2]
        if pairs and min(pairs) < FEW_SEEDS:
            text += few_seeds_note(min(pairs))
    else:
        text += " No baseline (`none`) runs in this experiment, so no differences are tested."
    return text


# --------------------------------------------------------------------------------------------------
# Cost


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
            row += [long_duration(cell.wall_time_s), _num(cell.peak_memory_mb, 0)]
            rows.append(row)
    return header, rows


# --------------------------------------------------------------------------------------------------
# What the runs were evaluated on


def evaluation_text(runs: list[RunRecord]) -> str:
    """What the runs' "dev" numbers are measured on: the dev file, or a holdout carved from train (a selection
    sweep's), so that a holdout table is never read as a dev result; several settings are listed."""
    found = set()
    for r in runs:
        if r.status == NOT_STARTED:
            continue
        data = r.config.get("data") or {}
        if data.get("eval_split") == "holdout":
            found.add(
                f"a holdout of {data.get('holdout_size')} training examples (seed {data.get('holdout_seed')}), "
                "not the official dev set: every 'dev' number here is a holdout number"
            )
        else:
            found.add("the dev set")
    return "; ".join(sorted(found)) if found else "the dev set"


# --------------------------------------------------------------------------------------------------
# Early stopping


def _epochs_text(epochs: list[int]) -> str:
    if len(set(epochs)) == 1:
        return f"epoch {epochs[0]}"
    return f"epochs {min(epochs)}–{max(epochs)} (median {statistics.median(epochs):g})"


def _early_stopped(runs: list[RunRecord]) -> tuple[list[RunRecord], list[int], list[int]]:
    """The completed runs with early stopping configured, the epochs where those that stopped early stopped, and the
    best dev epochs of all of them."""
    configured = [r for r in runs if r.status == "completed" and r.early_stopping is not None]
    stopped = [int(e) for r in configured if (e := r.metric("stopped_early_at_epoch")) is not None]
    best = [int(e) for r in configured if (e := r.metric("best_epoch")) is not None]
    return configured, stopped, best


def early_stopping_line(table: ExperimentTable) -> str | None:
    """One line on early stopping over the experiment's completed runs, e.g. 'early stopping (patience 3): 7 of 10
    runs stopped early, at epochs 4–8 (median 6); best dev epochs 2–6 (median 3)'; None when no completed run had
    it configured."""
    configured, stopped, best = _early_stopped(table.runs)
    if not configured:
        return None
    done = sum(1 for r in table.runs if r.status == "completed")
    settings = sorted({(r.early_stopping or {}).get("patience") for r in configured}, key=str)
    deltas = sorted({(r.early_stopping or {}).get("min_delta") for r in configured} - {0, 0.0, None}, key=str)
    how = "patience " + ", ".join(map(str, settings)) + (f"; min_delta {', '.join(map(str, deltas))}" if deltas else "")
    where = "" if len(configured) == done else f", configured in {len(configured)} of {done} completed runs"
    text = f"early stopping ({how}{where}): {len(stopped)} of {len(configured)} runs stopped early"
    if stopped:
        text += f", at {_epochs_text(stopped)}"
    if best:
        text += f"; best dev {_epochs_text(best)}"
    return text + "."


def early_stopping_rows(table: ExperimentTable) -> tuple[list[str], list[list[str]]]:
    """Per task and strategy with early stopping configured: how many runs stopped early, the epochs they stopped
    at and every run's best dev epoch (sorted; – where none)."""
    header = ["task", "strategy", "runs", "stopped early", "at epoch", "best dev epoch"]
    rows = []
    for task in table.tasks:
        for tag in table.tags:
            here = [r for r in table.runs if r.task == task and r.tag == tag]
            configured, stopped, best = _early_stopped(here)
            if not configured:
                continue
            row = [TASK_NAMES.get(task, task), tag, str(len(configured)), str(len(stopped))]
            row += [", ".join(map(str, sorted(stopped))) or "–", ", ".join(map(str, sorted(best))) or "–"]
            rows.append(row)
    return header, rows


def finite(x: float | None) -> float | None:
    """A number JSON can hold: NaN and ±inf (no seeds, one seed's std) become null."""
    return x if isinstance(x, int | float) and math.isfinite(x) else None


def seed_stats_json(values: Mapping[int, float]) -> dict[str, Any]:
    """n, mean, std and the per-seed values of one cell, as the report's JSON rows carry them."""
    s = summarize(list(values.values()))
    return {"n": s.n, "mean": finite(s.mean), "std": finite(s.std), "seeds": dict(values)}


def delta_json(test: PairedTest, p_holm: float) -> dict[str, Any]:
    """A paired comparison against the baseline, as the report's JSON rows carry it."""
    return {
        "mean": finite(test.mean_difference),
        "ci95": [finite(test.ci_low), finite(test.ci_high)],
        "t": finite(test.t),
        "p": finite(test.p),
        "p_holm": finite(p_holm),
        "n_pairs": test.n,
    }
