"""`clue-adv sweep --status`: what each cell's run directory says, whatever executor ran it, with Slurm's queue
where a directory names a job."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from clue_adv.progress import short_duration
from clue_adv.rundir import STALE_NOTE, last_update, read_summary, stale_running
from clue_adv.sweep.plan import Cell, SweepPlan
from clue_adv.sweep.slurm import read_slurm_record, slurm_queue


@dataclass
class CellStatus:
    cell: Cell
    status: str  # pending | running | completed | failed | interrupted | not started
    detail: str = ""
    job_id: str | None = None


STATUS_ORDER = ("completed", "running", "pending", "failed", "interrupted", "not started")


def sweep_status(plan: SweepPlan) -> list[CellStatus]:
    """What each cell's run directory says, whatever executor ran it; where the directory names a Slurm
    job, squeue tells pending from running, and a run that says `running` although its job has left the
    queue (cancelled, timed out, killed) is failed."""
    records = {c.directory: read_slurm_record(c.directory) for c in plan.cells}
    asks_slurm = any(r and r.get("executor") == "slurm" for r in records.values())
    queue = slurm_queue() if asks_slurm else None
    out = []
    for cell in plan.cells:
        record = records[cell.directory]
        job = record["job_id"] if record else None
        queued = queue.get(job) if queue is not None and job and record.get("executor") == "slurm" else None
        summary = (read_summary(cell.directory) or {}) if cell.state != "absent" else {}
        if queued == "PENDING":
            out.append(CellStatus(cell, "pending", f"job {job} waiting in the queue", job))
        elif queued is not None and cell.state != "running":
            # The job runs but has not started training yet (the previous attempt's summary, if any, is stale).
            out.append(CellStatus(cell, "running", f"job {job} {queued.lower()}, starting", job))
        elif cell.state == "completed":
            acc = summary.get("best_dev_accuracy")
            split = cell.config.data.eval_split  # a selection sweep's number is a holdout number
            shown = f"best {split} {100 * acc:.2f}" if isinstance(acc, int | float) and math.isfinite(acc) else ""
            out.append(CellStatus(cell, "completed", shown, job))
        elif cell.state in ("failed", "interrupted"):
            out.append(CellStatus(cell, cell.state, str(summary.get("error") or ""), job))
        elif cell.state == "running":
            left = queued is None and queue is not None and record is not None and record.get("executor") == "slurm"
            if left:
                detail = f"job {job} left the queue without finishing (cancelled, timed out or killed); rerun the sweep"
                out.append(CellStatus(cell, "failed", detail, job))
            elif queued is None and stale_running(cell.directory, summary):
                detail = f"{STALE_NOTE}, last update {_age(cell.directory)} ago; rerun the sweep"
                out.append(CellStatus(cell, "interrupted", detail, job))
            else:
                where = f"job {job} {queued.lower()}, " if queued else ""
                out.append(CellStatus(cell, "running", where + f"last update {_age(cell.directory)} ago", job))
        else:
            detail = f"job {job} left the queue before starting" if job and queue is not None else ""
            out.append(CellStatus(cell, "not started", detail, job))
    return out


def _age(directory: Path) -> str:
    updated = last_update(directory)
    return short_duration(time.time() - updated) if updated is not None else "?"
