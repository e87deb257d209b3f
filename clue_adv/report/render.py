"""Rendering the tables (markdown, LaTeX, CSV, JSON, a terminal table), the CSV files, and `build_report`, which
writes report.md, runs.csv, summary.csv, diagnostics.csv and plots/ from the run directories."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from clue_adv.config import require_nameable
from clue_adv.errors import ClueAdvError
from clue_adv.report.collect import NOT_STARTED, RunRecord, collect_runs
from clue_adv.report.diagnostics import (
    DIAGNOSTICS_COLUMNS,
    MODELS,
    DiagnosticsTable,
    diagnostics_json,
    diagnostics_note,
    diagnostics_numeric_rows,
    diagnostics_rows,
    diagnostics_tables,
    title,
)
from clue_adv.report.diagnostics import delta_text as diagnostics_delta_text
from clue_adv.report.diagnostics import value_text as diagnostics_value_text
from clue_adv.report.plots import experiment_plots
from clue_adv.report.study import CLUE_DEV_BERT_BASE, REFERENCE_NOTE, STUDY
from clue_adv.report.tables import (
    METRICS,
    TASK_NAMES,
    TASK_ORDER,
    ExperimentTable,
    accuracy_text,
    build_tables,
    cost_rows,
    delta_text,
    early_stopping_line,
    early_stopping_rows,
    evaluation_text,
    method_note,
    table_rows,
)
from clue_adv.rundir import atomic_write_text, first_non_directory
from clue_adv.stats import summarize

FORMATS = ("rich", "md", "csv", "json", "latex")
TABLES = ("accuracy", "diagnostics")  # what `clue-adv report --table` prints


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
    """One pass over the characters, so a replacement's own braces or backslashes are never escaped again. Markdown's
    `code` spans (the notes are written for report.md) become \texttt{code}."""
    parts = re.split(r"`([^`]*)`", s)  # odd indices: the code spans
    return "".join(
        rf"\texttt{{{_escape_chars(part)}}}" if i % 2 else _escape_chars(part) for i, part in enumerate(parts)
    )


def _escape_chars(s: str) -> str:
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


NUMERIC_COLUMNS = [
    "experiment", "strategy", "task", "n", "mean", "std",
    "delta_mean", "delta_ci95_low", "delta_ci95_high", "p", "p_holm", "n_pairs", "study_reference",
]  # fmt: skip


def _numeric_rows(table: ExperimentTable, metric: str) -> list[list[Any]]:
    """The main table as numbers for a spreadsheet or pandas, one row per strategy and task, accuracy in percent
    (the terminal's `13.00 ± 0.00 (n=2)` cells are text). Empty: not computed (too few seeds, no baseline)."""
    rows = []
    for r in table_json(table, metric)["rows"]:
        delta = r.get("delta") or {}
        ci = delta.get("ci95") or [None, None]
        values = [
            table.experiment, r["strategy"], r["task"], r["n"], r.get("mean"), r.get("std"),
            delta.get("mean"), ci[0], ci[1], delta.get("p"), delta.get("p_holm"), delta.get("n_pairs"),
            r.get("study_reference"),
        ]  # fmt: skip
        rows.append(["" if v is None else v for v in values])
    return rows


def render(tables: list[ExperimentTable], fmt: str, metric: str = "best") -> str:
    """The main table(s) alone in `fmt` (md, csv, json or latex)."""
    if fmt == "json":
        return json.dumps([table_json(t, metric) for t in tables], indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":  # one header: every experiment's rows have the same columns
        return _csv(NUMERIC_COLUMNS, [row for table in tables for row in _numeric_rows(table, metric)])
    parts = []
    for table in tables:
        header, rows = table_rows(table, metric)
        title = f"{table.experiment}: {METRICS[metric][1]}"
        if fmt == "md":
            parts.append(f"**{title}**\n\n" + _markdown(header, rows) + "\n" + method_note(table, metric) + "\n")
        elif fmt == "latex":
            parts.append(_latex(header, rows, f"{title}. {method_note(table, metric)}"))
        else:
            raise ClueAdvError(f"--format: unknown format {fmt!r} (valid: {', '.join(FORMATS)})")
    return "\n".join(parts)


def render_diagnostics(tables: list[DiagnosticsTable], fmt: str) -> str:
    """The diagnostics tables alone in `fmt` (md, csv, json or latex); an experiment without diagnostics has none
    (csv: the header alone, json: no entry)."""
    if fmt == "json":
        return json.dumps([diagnostics_json(dt) for dt in tables], indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        return _csv(DIAGNOSTICS_COLUMNS, [row for dt in tables for row in diagnostics_numeric_rows(dt)])
    parts = []
    for dt in tables:
        header, rows = diagnostics_rows(dt)
        if fmt == "md":
            parts.append(f"**{title(dt)}**\n\n" + _markdown(header, rows) + "\n" + diagnostics_note(dt) + "\n")
        elif fmt == "latex":
            parts.append(_latex(header, rows, f"{title(dt)}. {diagnostics_note(dt)}"))
        else:
            raise ClueAdvError(f"--format: unknown format {fmt!r} (valid: {', '.join(FORMATS)})")
    return "\n".join(parts)


def rich_diagnostics_table(dt: DiagnosticsTable) -> Any:
    """A diagnostics table for a terminal: a row per quantity and strategy, a column per task whose cells hold the
    mean ± std and the Δ vs the baseline on two lines."""
    out = Table(title=title(dt), show_lines=True)
    out.add_column("quantity", overflow="fold")
    out.add_column("strategy", overflow="fold")
    for task in dt.tasks:
        out.add_column(TASK_NAMES.get(task, task), justify="right", overflow="fold")
    for q in dt.quantities:
        tags = [tag for tag in dt.tags if any(dt.cell(task, tag) is not None for task in dt.tasks)]
        for i, tag in enumerate(tags):
            cells = []
            for task in dt.tasks:
                cell = dt.cell(task, tag)
                lines = [diagnostics_value_text(dt, cell, q)]
                delta = diagnostics_delta_text(dt, cell, q)
                if delta and delta != "baseline":
                    lines.append(f"Δ {delta}")
                cells.append("\n".join(lines))
            out.add_row(q.label if i == 0 else "", tag, *cells)
    return Group(out, Text(diagnostics_note(dt), style="dim italic"))


def rich_table(table: ExperimentTable, metric: str = "best") -> Any:
    """The main table for a terminal: one column per task, each cell on up to three lines (accuracy,
    Δ vs baseline, the study's figure), so it fits an 80-column terminal."""
    caption = method_note(table, metric)
    reference = table.has_reference and metric == "best"
    if reference:
        caption += " study: the study's published figure (one run, BERT-base)."
    # The note is printed under the table as a paragraph of its own: a table caption wraps to the table's width
    # (13 lines under a narrow one-row table), a paragraph to the terminal's.
    out = Table(title=f"{table.experiment}: {METRICS[metric][1]}", show_lines=True)
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
    notes = [Text(caption, style="dim italic")]
    evaluated = evaluation_text(table.runs)
    if evaluated != "the dev set":  # a selection sweep's holdout numbers must not read as dev results
        notes.append(Text(f"Evaluated on {evaluated}.", style="bold"))
    stopping = early_stopping_line(table)
    if stopping:
        notes.append(Text(stopping[0].upper() + stopping[1:], style="dim"))
    return Group(out, *notes)


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


def diagnostics_csv(tables: list[ExperimentTable]) -> str:
    """Every experiment's diagnostics, of the best and of the final model, one row per quantity, strategy and task
    (the header alone when no run recorded any)."""
    rows = [row for model in MODELS for dt in diagnostics_tables(tables, model) for row in diagnostics_numeric_rows(dt)]
    return _csv(DIAGNOSTICS_COLUMNS, rows)


def _diagnostics_section(table: ExperimentTable, dt: DiagnosticsTable | None) -> str | None:
    if dt is None:
        if not any(r.status == "completed" for r in table.runs):
            return None
        return (
            "### Diagnostics\n\nNo completed run of this experiment recorded diagnostics (`diagnostics.enabled: "
            "false`, or runs from before them)."
        )
    header, rows = diagnostics_rows(dt)
    return f"### Diagnostics of the {dt.model} model\n\n" + _markdown(header, rows) + "\n" + diagnostics_note(dt)


def _early_stopping_section(table: ExperimentTable) -> str | None:
    line = early_stopping_line(table)
    if line is None:
        return None
    header, rows = early_stopping_rows(table)
    return "### Early stopping\n\n" + line[0].upper() + line[1:] + "\n\n" + _markdown(header, rows)


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
        f"- evaluated on: {evaluation_text(table.runs)}",
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
    """Read every run under `results_dir`, write report.md, runs.csv, summary.csv, diagnostics.csv and plots/."""
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
    files = [out / "runs.csv", out / "summary.csv", out / "diagnostics.csv", out / "report.md"]
    atomic_write_text(files[0], runs_csv(runs))
    atomic_write_text(files[1], summary_csv(tables))
    atomic_write_text(files[2], diagnostics_csv(tables))
    diagnostics = {dt.experiment: dt for dt in diagnostics_tables(tables, "best")}

    figures: dict[str, list[tuple[str, Path]]] = {}
    if plots:
        for table in tables:
            figures[table.experiment] = experiment_plots(table, out / "plots")
            files += [p for _, p in figures[table.experiment]]

    parts = [f"# Results: `{root}`\n", f"{len(runs)} run(s): {_status_counts(runs)}.\n"]
    for table in tables:
        parts.append(f"## Experiment `{table.experiment}`\n\n{_setting(table)}\n")
        for metric in METRICS:
            header, rows = table_rows(table, metric)
            parts.append(f"### {METRICS[metric][1]}\n\n" + _markdown(header, rows) + "\n" + method_note(table, metric))
        for section in (_early_stopping_section(table), _diagnostics_section(table, diagnostics.get(table.experiment))):
            if section is not None:
                parts.append(section)
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
    atomic_write_text(files[3], "\n\n".join(p.rstrip("\n") for p in parts) + "\n")
    return ReportResult(tables, runs, files, skipped)
