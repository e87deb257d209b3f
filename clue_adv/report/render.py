"""The tables in each format of `clue-adv report --format`: markdown, LaTeX, CSV, JSON, and rich tables for a
terminal; the main (accuracy) tables and the diagnostics tables alike. report.md (build.py) and the CSV files
(csvfiles.py) are written with its markdown and CSV writers."""

from __future__ import annotations

import csv
import io
import json
import math
import re
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from clue_adv.errors import ClueAdvError
from clue_adv.report.diagnostics import (
    DIAGNOSTICS_COLUMNS,
    DiagnosticsTable,
    diagnostics_json,
    diagnostics_note,
    diagnostics_numeric_rows,
    diagnostics_rows,
    title,
)
from clue_adv.report.diagnostics import delta_text as diagnostics_delta_text
from clue_adv.report.diagnostics import value_text as diagnostics_value_text
from clue_adv.report.tables import (
    METRICS,
    TASK_NAMES,
    ExperimentTable,
    accuracy_text,
    delta_json,
    delta_text,
    early_stopping_line,
    evaluation_text,
    method_note,
    seed_stats_json,
    table_rows,
)

FORMATS = ("rich", "md", "csv", "json", "latex")
TABLES = ("accuracy", "diagnostics")  # what `clue-adv report --table` prints


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table (`|` in a cell escaped): `report --format md` and report.md's tables."""

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


def csv_text(header: list[str], rows: list[list[str]]) -> str:
    """A CSV text, header first: `report --format csv` and the report's CSV files."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()


def table_json(table: ExperimentTable, metric: str) -> dict[str, Any]:
    rows = []
    for tag in table.tags:
        for task in table.tasks:
            cell = table.cell(task, tag)
            if cell is None:
                rows.append({"strategy": tag, "task": task, "n": 0, "missing": True})
                continue
            test = cell.delta.get(metric)
            row: dict[str, Any] = {
                "strategy": tag,
                "strategy_name": cell.strategy,
                "task": task,
                **seed_stats_json(cell.values[metric]),
                "failed": cell.failed,
                "interrupted": cell.interrupted,
                "running": cell.running,
                "missing": cell.missing,
                "not_started": cell.not_started,
            }
            if test is not None:
                row["delta"] = delta_json(test, cell.p_holm.get(metric, math.nan))
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
        return csv_text(NUMERIC_COLUMNS, [row for table in tables for row in _numeric_rows(table, metric)])
    parts = []
    for table in tables:
        header, rows = table_rows(table, metric)
        title = f"{table.experiment}: {METRICS[metric][1]}"
        if fmt == "md":
            parts.append(f"**{title}**\n\n" + markdown_table(header, rows) + "\n" + method_note(table, metric) + "\n")
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
        return csv_text(DIAGNOSTICS_COLUMNS, [row for dt in tables for row in diagnostics_numeric_rows(dt)])
    parts = []
    for dt in tables:
        header, rows = diagnostics_rows(dt)
        if fmt == "md":
            parts.append(f"**{title(dt)}**\n\n" + markdown_table(header, rows) + "\n" + diagnostics_note(dt) + "\n")
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
