"""The report's CSV files, for a spreadsheet or pandas: runs.csv (a row per run), summary.csv (a row per
experiment, task and strategy) and diagnostics.csv (a row per diagnostic quantity, model, strategy and task)."""

from __future__ import annotations

import csv
import io
import math
from typing import Any

from clue_adv.report.collect import RunRecord
from clue_adv.report.diagnostics import DIAGNOSTICS_COLUMNS, MODELS, diagnostics_numeric_rows, diagnostics_tables
from clue_adv.report.render import csv_text
from clue_adv.report.tables import METRICS, ExperimentTable
from clue_adv.stats import summarize

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
    return csv_text(DIAGNOSTICS_COLUMNS, rows)
