"""The report's diagnostics tables (docs/DIAGNOSTICS.md): per experiment, task and strategy, the mean ± std over
seeds of what each run measured on its best (or final) model (input-gradient norm, input curvature, the train/dev
gap, accuracy under FGM and PGD at each radius), and the paired difference with the baseline, tested as the
accuracy tables test it (tables.compare_family). Runs that recorded no diagnostics are left out of a cell and
counted; an experiment none of whose runs recorded any has no table."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from clue_adv.diagnostics import parse_attack_metric
from clue_adv.report.collect import RunRecord
from clue_adv.report.tables import (
    TASK_NAMES,
    Comparison,
    ExperimentTable,
    compare_family,
    delta_json,
    paired_text,
    seed_stats_json,
)
from clue_adv.stats import FEW_SEEDS, few_seeds_note, paired_by_key, summarize

MODELS = {"best": "the best model (the best dev evaluation's weights)", "final": "the final model"}
GRAD_NORM = "diag/dev/input_grad_norm_mean"
CURVATURE = "diag/dev/input_curvature_mean"
CLEAN_ACCURACY = "diag/dev/accuracy"
EMBEDDING_NORM = "diag/dev/embedding_norm_mean"
SCALE_FREE_GRAD_NORM = "report/dev/scale_free_grad_norm"  # derived by the report: ‖x‖·‖∇ₓℓ‖ (see FIXED_QUANTITIES)


@dataclass(frozen=True)
class Quantity:
    """One diagnostic as the tables show it: the summary.json name, a label, its unit, and the factor from the
    recorded value to the shown one (fractions are shown in %, their differences in percentage points)."""

    key: str
    label: str
    unit: str
    scale: float = 1.0
    method: str | None = None  # fgm | pgd for an attack's accuracy
    epsilon: float | None = None
    # A quantity the report derives: the product of these recorded quantities of the same run (key: its own name)
    factors: tuple[str, ...] = ()

    @property
    def is_accuracy(self) -> bool:
        return self.scale == 100.0


# The quantities the theory speaks of (docs/DIAGNOSTICS.md), in the tables' order; the attack accuracies follow,
# one per method and radius found in the runs.
FIXED_QUANTITIES = (
    Quantity(GRAD_NORM, "input-gradient norm ‖∇ₓℓ‖ (dev)", "nats per embedding unit"),
    Quantity(EMBEDDING_NORM, "embedding norm ‖x‖ (dev)", "embedding units"),
    # Training can shrink ‖∇ₓℓ‖ by growing the embeddings (the LayerNorm after them undoes most of the scale, so the
    # loss changes about as fast per *relative* move), which a penalty on ‖∇ₓℓ‖ rewards: this product, the loss's
    # first-order change per unit of relative perturbation, is what a relative ε acts on and cannot be lowered by
    # rescaling. A product of the run's two means (runs record no per-example product), so every run has it.
    Quantity(
        SCALE_FREE_GRAD_NORM,
        "scale-free gradient norm ‖x‖·‖∇ₓℓ‖ (dev)",
        "nats per unit relative perturbation",
        factors=(EMBEDDING_NORM, GRAD_NORM),
    ),
    Quantity(CURVATURE, "input curvature tr ∇ₓ²ℓ (dev)", "nats per embedding unit²"),
    Quantity("diag/gap/loss", "gap: dev − train loss", "nats"),
    Quantity("diag/gap/accuracy", "gap: train − dev accuracy (pp)", "percentage points", 100.0),
    Quantity(CLEAN_ACCURACY, "accuracy, clean (dev subset, %)", "percent", 100.0),
)


def attack_quantity(name: str) -> Quantity | None:
    """The Quantity of an attack accuracy name (`diag/dev/pgd_accuracy/eps=0.03`); None for any other name."""
    parsed = parse_attack_metric(name)
    if parsed is None or parsed[1] != "accuracy":
        return None
    method, _, eps = parsed
    label = f"accuracy under {method.upper()}, ε = {eps:g} (%)"
    return Quantity(name, label, "percent", 100.0, method, eps)


@dataclass
class DiagnosticsCell:
    task: str
    tag: str
    strategy: str
    values: dict[str, dict[int, float]]  # quantity key -> seed -> value as shown (scaled)
    without: list[int] = field(default_factory=list)  # completed runs that recorded no diagnostics
    comparisons: dict[str, Comparison] = field(default_factory=dict)  # quantity key -> vs the baseline


@dataclass
class DiagnosticsTable:
    experiment: str
    model: str  # best | final
    tasks: list[str]
    tags: list[str]
    strategies: dict[str, str]
    baseline: str | None
    quantities: list[Quantity]
    cells: dict[tuple[str, str], DiagnosticsCell]
    settings: dict[str, str]  # diagnostics.<field> -> the values the runs used, for the note

    def cell(self, task: str, tag: str) -> DiagnosticsCell | None:
        return self.cells.get((task, tag))

    def digits(self, quantity: Quantity) -> int:
        """Decimals that show about 3 significant digits of the quantity's largest mean in the table (gradient
        norms may be 0.002 or 2, curvatures −12 or 3000); accuracies take 2, as in the accuracy tables."""
        if quantity.is_accuracy:
            return 2
        means = [abs(summarize(list(c.values[quantity.key].values())).mean) for c in self.cells.values()]
        largest = max((m for m in means if math.isfinite(m) and m > 0), default=0.0)
        return 2 if largest == 0 else min(6, max(0, 2 - math.floor(math.log10(largest))))


def build_diagnostics(table: ExperimentTable, model: str = "best") -> DiagnosticsTable | None:
    """The diagnostics of `table`'s completed runs on their `model` (best or final); None when none recorded any."""
    done = [r for r in table.runs if r.status == "completed"]
    names = {name for r in done for name in r.diagnostic_names(model)}
    if not names:
        return None
    names |= {q.key for q in FIXED_QUANTITIES if q.factors and set(q.factors) <= names}
    attacks = [q for q in map(attack_quantity, names) if q is not None]
    quantities = [q for q in FIXED_QUANTITIES if q.key in names]
    quantities += sorted(attacks, key=lambda q: (q.method != "fgm", q.epsilon))
    cells: dict[tuple[str, str], DiagnosticsCell] = {}
    for (task, tag), accuracy_cell in table.cells.items():
        cell = DiagnosticsCell(task, tag, accuracy_cell.strategy, {q.key: {} for q in quantities})
        for r in sorted((r for r in done if r.task == task and r.tag == tag), key=lambda r: r.seed):
            if not r.diagnostic_names(model):
                cell.without.append(r.seed)
            for q in quantities:
                value = _value(r, model, q)
                if value is not None:
                    cell.values[q.key][r.seed] = q.scale * value
        cells[(task, tag)] = cell
    out = DiagnosticsTable(
        table.experiment,
        model,
        table.tasks,
        table.tags,
        table.strategies,
        table.baseline,
        quantities,
        cells,
        _settings(table),
    )
    _compare(out)
    return out


def _value(run: RunRecord, model: str, quantity: Quantity) -> float | None:
    """The run's recorded value of `quantity`, or the product of its factors (None if any is missing)."""
    if not quantity.factors:
        return run.diagnostic(model, quantity.key)
    factors = [run.diagnostic(model, key) for key in quantity.factors]
    return math.prod(factors) if all(f is not None for f in factors) else None


def _settings(table: ExperimentTable) -> dict[str, str]:
    """The diagnostics settings the completed runs used (several values: runs measured differently, which the note
    then shows)."""
    out = {}
    for name in ("examples", "probes", "pgd_steps", "seed"):
        found = {(r.config.get("diagnostics") or {}).get(name) for r in table.runs if r.status == "completed"}
        # seed null: each run's own seed, the one that pairs same-seed runs on the same examples
        out[name] = ", ".join(sorted("the run's" if v is None else str(v) for v in found))
    return out


def _compare(dt: DiagnosticsTable) -> None:
    """Δ vs the baseline, paired on seeds (same seed: same examples and probes); one Holm family per quantity:
    every strategy × task comparison of it, as the accuracy tables make one per metric."""
    if dt.baseline is None:
        return
    for q in dt.quantities:
        pairs = {}
        for (task, tag), cell in dt.cells.items():
            base = dt.cell(task, dt.baseline)
            if tag != dt.baseline and base is not None:
                pairs[(task, tag)] = (cell.values[q.key], base.values[q.key])
        for key, comparison in compare_family(pairs).items():
            dt.cells[key].comparisons[q.key] = comparison


# --------------------------------------------------------------------------------------------------
# Text


def value_text(dt: DiagnosticsTable, cell: DiagnosticsCell | None, quantity: Quantity) -> str:
    if cell is None:
        return "missing"
    s = summarize(list(cell.values[quantity.key].values()))
    without = f"; {len(cell.without)} without diagnostics" if cell.without else ""
    if s.n == 0:
        return f"– ({len(cell.without)} without diagnostics)" if cell.without else "–"
    digits = dt.digits(quantity)
    std = f"{s.std:.{digits}f}" if math.isfinite(s.std) else "–"
    return f"{s.mean:.{digits}f} ± {std} (n={s.n}{without})"


def delta_text(dt: DiagnosticsTable, cell: DiagnosticsCell | None, quantity: Quantity) -> str:
    if cell is None or dt.baseline is None:
        return ""
    if cell.tag == dt.baseline:
        return "baseline"
    comparison = cell.comparisons.get(quantity.key)
    if comparison is None:
        return "no shared seeds"
    return paired_text(comparison.test, comparison.p_holm, dt.digits(quantity))


def title(dt: DiagnosticsTable) -> str:
    return f"{dt.experiment}: diagnostics of the {dt.model} model"


def diagnostics_rows(dt: DiagnosticsTable, repeat_quantity: bool = False) -> tuple[list[str], list[list[str]]]:
    """Header and rows as text: a group of rows per quantity (one per strategy), a value and a Δ column per task.
    The quantity is named on its group's first row only, unless `repeat_quantity`."""
    header = ["quantity", "strategy"]
    for task in dt.tasks:
        name = TASK_NAMES.get(task, task)
        header.append(name)
        if dt.baseline is not None:
            header.append(f"{name} Δ vs {dt.baseline} [95% CI]")
    rows = []
    for q in dt.quantities:
        tags = [tag for tag in dt.tags if any(dt.cell(task, tag) is not None for task in dt.tasks)]
        for i, tag in enumerate(tags):
            row = [q.label if i == 0 or repeat_quantity else "", tag]
            for task in dt.tasks:
                cell = dt.cell(task, tag)
                row.append(value_text(dt, cell, q))
                if dt.baseline is not None:
                    row.append(delta_text(dt, cell, q))
            rows.append(row)
    return header, rows


def diagnostics_note(dt: DiagnosticsTable) -> str:
    settings = "; ".join(f"{k} {v}" for k, v in dt.settings.items())
    text = (
        f"Measured on {MODELS[dt.model]} of each run (`diagnostics.{dt.model}` in summary.json), on a fixed subset "
        "of dev (and as many train examples for the gap) drawn by the run's diagnostics seed "
        f"(docs/DIAGNOSTICS.md; diagnostics settings: {settings}). Cells: mean ± sample std over seeds "
        "(n = completed runs that recorded it). Accuracies are in % of the dev subset (clean: ε = 0), the "
        "accuracy gap in percentage points; ε is relative to each example's embedding norm; the curvature is a "
        "signed Hutchinson estimate whose per-run standard error is in summary.json."
    )
    if dt.baseline is not None:
        n_tests = sum(1 for c in dt.cells.values() for comp in c.comparisons.values() if math.isfinite(comp.test.p))
        text += (
            f" Δ: mean paired difference vs `{dt.baseline}` over the seeds both recorded (same seed: same examples "
            "and probes), in the quantity's unit, 95% t-interval, paired t-test p-value Holm-adjusted within each "
            f"quantity across its strategy × task comparisons ({n_tests} tests in all); * marks adjusted p < 0.05."
        )
        pairs = [comp.test.n for c in dt.cells.values() for comp in c.comparisons.values() if comp.test.n >= 2]
        if pairs and min(pairs) < FEW_SEEDS:
            text += few_seeds_note(min(pairs))
    else:
        text += " No baseline (`none`) runs in this experiment, so no differences are tested."
    return text


# --------------------------------------------------------------------------------------------------
# Numbers


def diagnostics_json(dt: DiagnosticsTable) -> dict[str, Any]:
    rows = []
    for q in dt.quantities:
        for tag in dt.tags:
            for task in dt.tasks:
                cell = dt.cell(task, tag)
                if cell is None:
                    continue
                row: dict[str, Any] = {
                    "quantity": q.key,
                    "label": q.label,
                    "unit": q.unit,
                    "strategy": tag,
                    "strategy_name": cell.strategy,
                    "task": task,
                    **seed_stats_json(cell.values[q.key]),
                    "without_diagnostics": cell.without,
                }
                comparison = cell.comparisons.get(q.key)
                if comparison is not None:
                    row["delta"] = delta_json(comparison.test, comparison.p_holm)
                rows.append(row)
    return {"experiment": dt.experiment, "model": dt.model, "baseline": dt.baseline, "rows": rows}


DIAGNOSTICS_COLUMNS = [
    "experiment", "model", "task", "strategy", "strategy_name", "quantity", "unit", "n", "mean", "std",
    "delta_mean", "delta_ci95_low", "delta_ci95_high", "p", "p_holm", "n_pairs", "without_diagnostics",
]  # fmt: skip


def diagnostics_numeric_rows(dt: DiagnosticsTable) -> list[list[Any]]:
    """One row per quantity, strategy and task, as numbers in the unit named (fractions shown in %); empty: not
    computed."""
    rows = []
    for r in diagnostics_json(dt)["rows"]:
        delta = r.get("delta") or {}
        ci = delta.get("ci95") or [None, None]
        values = [
            dt.experiment, dt.model, r["task"], r["strategy"], r["strategy_name"], r["quantity"], r["unit"], r["n"],
            r.get("mean"), r.get("std"), delta.get("mean"), ci[0], ci[1], delta.get("p"), delta.get("p_holm"),
            delta.get("n_pairs"), len(r["without_diagnostics"]),
        ]  # fmt: skip
        rows.append(["" if v is None else v for v in values])
    return rows


# --------------------------------------------------------------------------------------------------
# What the plots draw


def robust_curve(dt: DiagnosticsTable, task: str, tag: str, method: str) -> tuple[list[float], list[float], int]:
    """(ε, mean accuracy % over seeds) of a strategy under one attack, ε = 0 being the clean accuracy of the same
    subset; and how many seeds the clean point has. Radii no run of the cell measured are left out."""
    cell = dt.cell(task, tag)
    if cell is None:
        return [], [], 0
    xs, ys = [], []
    points = [(0.0, CLEAN_ACCURACY)] + [(q.epsilon, q.key) for q in dt.quantities if q.method == method]
    for eps, key in points:
        values = list(cell.values.get(key, {}).values())
        if values and eps is not None:
            xs.append(eps)
            ys.append(summarize(values).mean)
    return xs, ys, len(cell.values.get(CLEAN_ACCURACY, {}))


@dataclass(frozen=True)
class MechanismPoint:
    task: str
    tag: str
    change: float  # mean paired Δ of the diagnostic
    gain: float  # mean paired Δ of best-epoch dev accuracy (pp)
    seeds: list[int]


def mechanism_points(table: ExperimentTable, dt: DiagnosticsTable, key: str) -> list[MechanismPoint]:
    """Per strategy and task: the mean paired change of diagnostic `key` and the mean paired gain in best-epoch dev
    accuracy vs the baseline, both over the same seeds (those where the strategy and the baseline have both)."""
    if table.baseline is None or dt.baseline is None:
        return []
    out = []
    for task in dt.tasks:
        base, base_diag = table.cell(task, table.baseline), dt.cell(task, dt.baseline)
        if base is None or base_diag is None:
            continue
        for tag in dt.tags:
            cell, diag = table.cell(task, tag), dt.cell(task, tag)
            if tag == dt.baseline or cell is None or diag is None:
                continue
            accuracy, base_accuracy = cell.values["best"], base.values["best"]
            value, base_value = diag.values.get(key, {}), base_diag.values.get(key, {})
            seeds = sorted(set(accuracy) & set(base_accuracy) & set(value) & set(base_value))
            if not seeds:
                continue
            gain, _ = paired_by_key({s: accuracy[s] for s in seeds}, base_accuracy)
            change, _ = paired_by_key({s: value[s] for s in seeds}, base_value)
            out.append(MechanismPoint(task, tag, change.mean_difference, gain.mean_difference, seeds))
    return out


def diagnostics_tables(tables: list[ExperimentTable], model: str = "best") -> list[DiagnosticsTable]:
    """The diagnostics table of every experiment where some run recorded diagnostics of its `model`."""
    return [dt for table in tables if (dt := build_diagnostics(table, model)) is not None]
