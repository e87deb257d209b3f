"""`build_report`: the run directories read, then report.md, runs.csv, summary.csv, diagnostics.csv and plots/
written; report.md's sections (setting, tables, early stopping, diagnostics, cost, plots, runs that did not
complete, how the runs were made, the published reference) are put together here."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clue_adv.config import require_nameable
from clue_adv.errors import ClueAdvError
from clue_adv.report.collect import NOT_STARTED, RunRecord, collect_runs, sweep_invocations
from clue_adv.report.csvfiles import diagnostics_csv, runs_csv, summary_csv
from clue_adv.report.diagnostics import DiagnosticsTable, diagnostics_note, diagnostics_rows, diagnostics_tables
from clue_adv.report.peak import peak_note, peak_rows
from clue_adv.report.plots import experiment_plots
from clue_adv.report.provenance import provenance_section
from clue_adv.report.render import markdown_table
from clue_adv.report.study import CLUE_DEV_BERT_BASE, REFERENCE_NOTE, STUDY
from clue_adv.report.tables import (
    METRICS,
    TASK_NAMES,
    TASK_ORDER,
    ExperimentTable,
    build_tables,
    cost_rows,
    early_stopping_line,
    early_stopping_rows,
    evaluation_text,
    method_note,
    table_rows,
)
from clue_adv.rundir import atomic_write_text, first_non_directory


def _diagnostics_section(table: ExperimentTable, dt: DiagnosticsTable | None) -> str | None:
    if dt is None:
        if not any(r.status == "completed" for r in table.runs):
            return None
        return (
            "### Diagnostics\n\nNo completed run of this experiment recorded diagnostics (`diagnostics.enabled: "
            "false`, or runs from before them)."
        )
    header, rows = diagnostics_rows(dt)
    return f"### Diagnostics of the {dt.model} model\n\n" + markdown_table(header, rows) + "\n" + diagnostics_note(dt)


def _early_stopping_section(table: ExperimentTable) -> str | None:
    line = early_stopping_line(table)
    if line is None:
        return None
    header, rows = early_stopping_rows(table)
    return "### Early stopping\n\n" + line[0].upper() + line[1:] + "\n\n" + markdown_table(header, rows)


def _peak_section(table: ExperimentTable) -> str | None:
    header, rows = peak_rows(table)
    if not rows:
        return None
    return "### The dev peak\n\n" + markdown_table(header, rows) + "\n" + peak_note(table)


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
    return "## Published reference\n\n" + markdown_table(header, rows) + "\n" + REFERENCE_NOTE + " " + where + "\n"


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
    invocations = sweep_invocations(root)

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
            parts.append(
                f"### {METRICS[metric][1]}\n\n" + markdown_table(header, rows) + "\n" + method_note(table, metric)
            )
        sections = (
            _peak_section(table),
            _early_stopping_section(table),
            _diagnostics_section(table, diagnostics.get(table.experiment)),
        )
        parts += [section for section in sections if section is not None]
        header, rows = cost_rows(table)
        parts.append(
            "### Cost\n\n" + markdown_table(header, rows) + "\nStep time: mean wall time per optimizer step (the "
            "first step excluded); × baseline: ratio of mean step times on the same task. Runs sharing a machine "
            "(parallel jobs) slow each other, so compare costs within one sweep. Peak memory: GPU allocations on "
            "CUDA; on CPU the peak resident memory of the run's process, largest over the seeds; – where no run "
            "measured it (in a one-job sweep, runs after the first share the process: their CPU peak is each run's "
            "own where Linux lets the peak be reset between runs, and not recorded elsewhere)."
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
        provenance = provenance_section(table, invocations.get(table.experiment, []))
        if provenance is not None:
            parts.append(provenance)
    parts.append(reference_section(tables))
    atomic_write_text(files[3], "\n\n".join(p.rstrip("\n") for p in parts) + "\n")
    return ReportResult(tables, runs, files, skipped)
