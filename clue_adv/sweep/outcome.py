"""How a cell's run attempt ended, the one mapping every executor shares: `attempt` trains a cell and says
completed, skipped, failed or interrupted (and the exit code a worker process ends with); `worker_result` reads
the same back from a worker's exit code and its run directory. A cell that fails before its run starts (bad data,
a tokenizer that does not load) still leaves a run directory that says so, and `SweepProgress` prints each
result as it comes."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from clue_adv.config import dump_config
from clue_adv.errors import ClueAdvError, RunFailed
from clue_adv.progress import short_duration
from clue_adv.rundir import (
    atomic_write_json,
    atomic_write_text,
    identity,
    never_trained,
    read_config,
    read_summary,
    run_lock_held,
    stored_identity,
    summary_header,
)
from clue_adv.sweep.plan import Cell
from clue_adv.train import train

INTERRUPTED_EXIT = 130  # what a shell reports for Ctrl-C (128 + SIGINT)


@dataclass
class CellResult:
    cell: Cell
    status: str  # completed | skipped | failed | interrupted
    seconds: float = 0.0
    error: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class SweepResult:
    results: list[CellResult]
    interrupted: bool = False

    def by_status(self, status: str) -> list[CellResult]:
        return [r for r in self.results if r.status == status]

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return INTERRUPTED_EXIT
        return 1 if self.by_status("failed") else 0


@dataclass
class Attempt:
    """How one call of `train` ended."""

    status: str  # completed | skipped | failed | interrupted
    error: str | None = None
    exit_code: int = 0  # a worker's: 0 completed or skipped, 1 the run failed, 2 bad input, 130 interrupted
    summary: dict[str, Any] = field(default_factory=dict)
    directory: Path | None = None


def attempt(
    cell: Cell, force: bool, *, record_setup: bool = True, contain_bugs: bool = False, **options: Any
) -> Attempt:
    """Train `cell` once (`options` go to `train`). A failure before the run started (ClueAdvError: train writes
    the run directory only once setup succeeded) is recorded in the directory unless `record_setup` is False (a
    worker leaves that to the sweep, which also sees it killed). Any other exception is a bug: it propagates,
    unless `contain_bugs`, where it fails this cell only (one process running many cells)."""
    before = summary_stamp(cell.directory)
    try:
        outcome = train(cell.config, force=force, **options)
    except KeyboardInterrupt:
        return Attempt("interrupted", exit_code=INTERRUPTED_EXIT)
    except RunFailed as e:  # the run's own summary says why
        return Attempt("failed", e.message, exit_code=e.exit_code)
    except ClueAdvError as e:  # e.g. a data file missing for one task: the other cells still run
        summary = record_setup_failure(cell, str(e), before) if record_setup else None
        return Attempt("failed", str(e), exit_code=e.exit_code, summary=summary or {})
    except Exception as e:
        if not contain_bugs:
            raise
        error = f"{type(e).__name__}: {e}"
        return Attempt("failed", error, exit_code=1, summary=record_setup_failure(cell, error, before) or {})
    return Attempt("skipped" if outcome.skipped else "completed", summary=outcome.summary, directory=outcome.directory)


def summary_stamp(directory: Path) -> int | None:
    """summary.json's modification time, to tell afterwards whether a run attempt wrote it."""
    try:
        return (directory / "summary.json").stat().st_mtime_ns
    except OSError:
        return None


def record_setup_failure(cell: Cell, error: str, before: int | None = None) -> dict[str, Any] | None:
    """Leave a trace of a cell that failed before its run started (missing data file, bad tokenizer): train
    writes its run directory only once setup succeeded, so without this the report and `sweep --status`
    would show the cell as never started. `before`: `summary_stamp` taken before the attempt; a summary.json
    written since then is the attempt's own account and is kept. A directory holding another config's run
    is never touched. Returns the summary written, or None."""
    directory = cell.directory
    if before is not None and summary_stamp(directory) != before:
        return None
    if run_lock_held(directory):  # another process is training there (e.g. refused by its lock): not ours to mark
        return None
    stored = read_config(directory)
    other = stored is not None and stored_identity(stored) != identity(cell.config.resolved())
    if other and not never_trained(directory):  # another config's results: kept (its own setup failure is not)
        return None
    header = summary_header(cell.config, directory, "failed")
    summary = {"status": "failed", "error": error, "failed_stage": "setup", **header}  # the order summaries had
    try:
        if stored is None or other:
            atomic_write_text(directory / "config.yaml", dump_config(cell.config))
        atomic_write_json(directory / "summary.json", summary)
    except OSError:  # e.g. the output folder cannot be created: the sweep's own message says so already
        return None
    return summary


SESSION_MARK = "=== clue-adv sweep worker session started"  # train.log: one per worker start, then its output


def worker_result(
    cell: Cell, returncode: int | None, seconds: float, log: Path | None = None, fallback: str | None = None
) -> CellResult:
    """What a finished worker left in its run directory; a run that died without saying so (killed,
    out of host memory) still says `running` and is marked failed here, so the directory is honest.
    `fallback`: how the worker ended, where its exit code says nothing (a job that left the queue)."""
    summary = read_summary(cell.directory) or {}
    status = summary.get("status")
    if returncode == 0 and status == "completed":
        return CellResult(cell, "completed", seconds, summary=summary)
    if status == "interrupted" or returncode in (INTERRUPTED_EXIT, -signal.SIGINT):
        return CellResult(cell, "interrupted", seconds, summary.get("error"), summary)
    error = summary.get("error") if status == "failed" else None
    if error is None:
        tail = log_tail(log)
        how = f"exit code {returncode}" if returncode is None or returncode >= 0 else f"signal {-returncode}"
        error = fallback or f"worker ended with {how}" + (f": {tail}" if tail else "")
        if status == "running":
            summary.update(status="failed", error=error)
            atomic_write_json(cell.directory / "summary.json", summary)
        elif status is None:  # the worker failed before its run started (setup): no summary yet
            summary = record_setup_failure(cell, error) or summary
    return CellResult(cell, "failed", seconds, error, summary)


def log_tail(log: Path | None) -> str:
    """The worker's error line (it prints `error: ...`), else its last line, of the log's latest session (a
    resumed run's log holds its earlier ones too); cut to one readable line."""
    if log is None or not log.is_file():
        return ""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    marks = [i for i, ln in enumerate(lines) if ln.startswith(SESSION_MARK)]
    lines = lines[marks[-1] + 1 :] if marks else lines
    errors = [ln.removeprefix("error: ") for ln in lines if ln.startswith("error: ")]
    line = errors[-1] if errors else (lines[-1] if lines else "")
    return line if len(line) <= 300 else line[:300] + "…"


class SweepProgress:
    """One bar for the sweep (runs done / total, ETA) on a terminal; plain lines otherwise."""

    def __init__(self, total: int, already_done: int, console: Console, show: bool | None = None) -> None:
        self.console = console
        self.bar = console.is_terminal if show is None else show
        self.total = total
        self.done = already_done
        self._started_with = already_done
        self._t0 = time.perf_counter()
        self._progress: Any = None
        self._task: Any = None
        self._running: dict[str, float] = {}  # cell name -> when it started (local executors report starts)
        self._most_at_once = 0
        self._run_seconds: list[float] = []  # durations of the runs completed by this invocation

    def __enter__(self) -> SweepProgress:
        self._t0 = time.perf_counter()
        if self.bar:
            self._progress = Progress(
                TextColumn("[bold]sweep"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("runs"),
                TimeElapsedColumn(),
                # Ours, not rich's TimeRemainingColumn: its rate has the bias `eta` corrects for parallel runs.
                TextColumn("ETA {task.fields[eta]}"),
                console=self.console,
            )
            self._progress.start()
            self._task = self._progress.add_task("sweep", total=self.total, completed=self.done, eta="?")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def eta(self) -> str:
        finished = self.done - self._started_with
        if finished <= 0:
            return "?"
        now = time.perf_counter()
        if not self._run_seconds or not self._most_at_once:
            # No starts seen (a scheduler places the runs) or nothing completed yet: the overall rate.
            return short_duration((now - self._t0) / finished * (self.total - self.done))
        # Runs go `_most_at_once` at a time: the first runs end together, so elapsed / finished would count each
        # run's time once per worker (a 20-minute run at --jobs 2 first said 6 h for 3 h of work). Instead: the
        # runs not started take the mean completed run's time, the running ones what is left of it, shared
        # among the workers.
        mean = sum(self._run_seconds) / len(self._run_seconds)
        queued = max(self.total - self.done - len(self._running), 0)
        left = sum(max(mean - (now - t), 0.0) for t in self._running.values())
        return short_duration((queued * mean + left) / self._most_at_once)

    def started(self, cell: Cell, where: str = "") -> None:
        self._running[cell.name] = time.perf_counter()
        self._most_at_once = max(self._most_at_once, len(self._running))
        if not self.bar:
            self.console.print(f"[{self.done}/{self.total}] start {cell.name}{where}", highlight=False, soft_wrap=True)

    def finished(self, result: CellResult) -> None:
        self.done += 1
        self._running.pop(result.cell.name, None)
        if result.status == "completed":
            self._run_seconds.append(result.seconds)
        acc = result.summary.get("best_dev_accuracy")
        split = result.cell.config.data.eval_split  # a selection sweep's number is a holdout number
        detail = f" best {split} {100 * acc:.2f}" if result.status == "completed" and acc is not None else ""
        if result.error:
            detail += f" ({result.error})"
        duration = short_duration(result.seconds)
        line = f"[{self.done}/{self.total}] {result.status} {result.cell.name}{detail} in {duration}"
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done, eta=self.eta())
            style = {"completed": "green", "failed": "red", "interrupted": "yellow"}.get(result.status, "")
            self._progress.console.print(f"[{style}]{line}[/]" if style else line, highlight=False, soft_wrap=True)
        else:
            eta = f"; ETA {self.eta()}" if result.status != "interrupted" else ""
            self.console.print(line + eta, highlight=False, soft_wrap=True)
