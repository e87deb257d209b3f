"""The report on a terminal: what `clue-adv report` prints (the accuracy or the diagnostics tables, rich or as text
on stdout; what it skipped and wrote on stderr), and the report at the end of `clue-adv sweep`."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from clue_adv.errors import ClueAdvError
from clue_adv.report.build import ReportResult, build_report
from clue_adv.report.diagnostics import diagnostics_tables
from clue_adv.report.render import render, render_diagnostics, rich_diagnostics_table, rich_table


def print_report(
    out: Console, err: Console, built: ReportResult, results_dir: Path, table: str, fmt: str, metric: str
) -> None:
    """`clue-adv report`'s output: `table` (accuracy or diagnostics) in `fmt` on `out` (stdout, so that
    `> table.tex` holds only the table), what was skipped and which files were written on `err`."""
    for line in built.skipped:
        err.print(f"skipped {line}", highlight=False, markup=False)
    if table == "diagnostics":
        found = diagnostics_tables(built.tables, metric)
        if not found:
            err.print(
                f"no completed run under {results_dir} recorded diagnostics of its {metric} model "
                "(diagnostics.enabled: false, or runs from before them): no diagnostics table",
                highlight=False,
                markup=False,
            )
        if fmt == "rich":
            for dt in found:
                out.print(rich_diagnostics_table(dt))
        else:
            sys.stdout.write(render_diagnostics(found, fmt))
    elif fmt == "rich":
        for t in built.tables:
            out.print(rich_table(t, metric))
    else:
        sys.stdout.write(render(built.tables, fmt, metric))
    written = [str(p) for p in built.files if p.suffix != ".png"]
    # every format writes the files too: say so, on stderr, so that `> table.tex` holds only the table
    also = "wrote" if fmt == "rich" else "also wrote"
    err.print(f"{also} {', '.join(written)} and {len(built.files) - len(written)} plot(s)", highlight=False)


def report_after_sweep(out: Console, err: Console, root: Path, experiments: Sequence[str], metric: str) -> None:
    """Write the sweep's report under `root` and print its tables. The runs are done and saved whatever happens
    here: a report that fails says so and how to retry, and raises nothing."""
    try:
        built = build_report(root, experiments=list(experiments))
    except ClueAdvError as e:
        err.print(f"[yellow]report skipped:[/] {e}", highlight=False)
    except Exception as e:  # the runs are done and saved; a report problem must not hide that
        err.print(
            f"[yellow]report failed:[/] {type(e).__name__}: {e} (the runs are saved; `clue-adv report` retries)",
            highlight=False,
        )
    else:
        for t in built.tables:
            out.print(rich_table(t, metric))
        for line in built.skipped:
            err.print(f"[yellow]skipped[/] {line}", highlight=False, markup=False)
        err.print(f"report: {root / 'report.md'}", highlight=False)
