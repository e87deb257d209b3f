"""`clue-adv report`: tables, CSVs and plots rebuilt from run directories alone, so it works on a partial sweep
and can be rerun at any time. One table per experiment: rows = strategies (directory tags), columns = tasks,
each cell the mean ± std over seeds of the dev accuracy, and the difference to the baseline (`none`) over the
seeds both completed, with a 95% CI and a Holm-adjusted paired t-test. Where runs recorded diagnostics, a table of
them (input-gradient norm, curvature, train/dev gap, accuracy under attack) with the same paired comparison.

collect: run directories and sweep manifests -> RunRecord; study: the published figures and their setting;
tables: RunRecords -> ExperimentTable and its text; diagnostics: ExperimentTable -> DiagnosticsTable and its text;
render: the tables in each format; csvfiles: runs.csv, summary.csv, diagnostics.csv; build: `build_report`
and report.md; plots: PNGs; console: what `clue-adv report` and `sweep` print.
"""

from clue_adv.report.build import ReportResult, build_report, reference_section
from clue_adv.report.collect import MANIFEST, NOT_STARTED, RunRecord, collect_runs, planned_runs
from clue_adv.report.csvfiles import RUN_COLUMNS, diagnostics_csv, runs_csv, summary_csv
from clue_adv.report.diagnostics import DiagnosticsTable, build_diagnostics, diagnostics_tables
from clue_adv.report.render import (
    FORMATS,
    TABLES,
    render,
    render_diagnostics,
    rich_diagnostics_table,
    rich_table,
    table_json,
)
from clue_adv.report.study import (
    CLUE_DEV_BERT_BASE,
    CLUE_TEST_BERT_BASE,
    REFERENCE_NOTE,
    STUDY,
    STUDY_LABELS,
    STUDY_PARAMS,
    STUDY_PROTOCOL,
)
from clue_adv.report.tables import (
    BASELINE,
    METRICS,
    TASK_NAMES,
    TASK_ORDER,
    CellStats,
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
from clue_adv.rundir import STALE_AFTER_S, STALE_NOTE, last_update, stale_running  # moved to rundir

__all__ = [
    "BASELINE",
    "CLUE_DEV_BERT_BASE",
    "CLUE_TEST_BERT_BASE",
    "FORMATS",
    "MANIFEST",
    "METRICS",
    "NOT_STARTED",
    "REFERENCE_NOTE",
    "RUN_COLUMNS",
    "STALE_AFTER_S",
    "STALE_NOTE",
    "STUDY",
    "STUDY_LABELS",
    "STUDY_PARAMS",
    "STUDY_PROTOCOL",
    "TABLES",
    "TASK_NAMES",
    "TASK_ORDER",
    "CellStats",
    "DiagnosticsTable",
    "ExperimentTable",
    "ReportResult",
    "RunRecord",
    "accuracy_text",
    "build_diagnostics",
    "build_report",
    "build_tables",
    "collect_runs",
    "cost_rows",
    "delta_text",
    "diagnostics_csv",
    "diagnostics_tables",
    "early_stopping_line",
    "evaluation_text",
    "early_stopping_rows",
    "last_update",
    "method_note",
    "planned_runs",
    "reference_section",
    "render",
    "render_diagnostics",
    "rich_diagnostics_table",
    "rich_table",
    "runs_csv",
    "stale_running",
    "summary_csv",
    "table_json",
    "table_rows",
]
