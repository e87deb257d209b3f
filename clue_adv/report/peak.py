"""The dev peak per strategy: when each run's dev accuracy peaked and how much it lost by the last epoch — the
study's claim is that the regularizers raise *and delay* the peak of a model trained far past it."""

from __future__ import annotations

import math
import statistics

from clue_adv.report.tables import TASK_NAMES, ExperimentTable
from clue_adv.stats import summarize


def peak_note(table: ExperimentTable) -> str:
    stopped = any(r.metric("stopped_early_at_epoch") is not None for r in table.runs)
    return (
        "Per completed run: the epoch of its best dev accuracy, and best − final: the dev accuracy (percentage "
        "points) the last epoch trained had lost against the best one (0 where the last epoch was the best"
        + ("; a run stopped early counts its stop as its last epoch" if stopped else "")
        + "). A later peak with a smaller loss after it is a model that overfits later and less within the same "
        "budget; mean ± sample std over seeds."
    )


def peak_rows(table: ExperimentTable) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per task and strategy with completed runs, epochs trained, best epoch median (range), and
    best − final accuracy."""
    header = ["task", "strategy", "runs", "epochs trained", "best epoch: median (range)", "best − final (pp)"]
    rows = []
    for task in table.tasks:
        for tag in table.tags:
            cell = table.cell(task, tag)
            if cell is None or not (cell.best_epochs or cell.best_minus_final):
                continue
            best, drops, trained = cell.best_epochs, cell.best_minus_final, cell.epochs_trained
            s = summarize(drops)
            std = f"{s.std:.2f}" if math.isfinite(s.std) else "–"
            rows.append(
                [
                    TASK_NAMES.get(task, task),
                    tag,
                    str(cell.completed),
                    "–" if not trained else f"{trained[0]}" if len(trained) == 1 else f"{trained[0]}–{trained[-1]}",
                    f"{statistics.median(best):g} ({min(best)}–{max(best)})" if best else "–",
                    f"{s.mean:.2f} ± {std}" if drops else "–",
                ]
            )
    return header, rows
