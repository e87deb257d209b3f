"""Progress for a run: a rich bar on a terminal, plain log lines otherwise (CI logs, files, Slurm); and the two
ways durations are written: compact on progress lines (`1m05s`), readable in the report's tables (`1.5 min`)."""

from __future__ import annotations

import math
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class RunProgress:
    """`total_steps=None`: a run bounded by time, not steps (the bar then shows no end); `epochs=None`: a run that
    does not count epochs (pretraining). `eval_name` labels the latest evaluation's accuracy."""

    def __init__(
        self,
        name: str,
        total_steps: int | None,
        epochs: int | None,
        show: bool | None = None,
        console: Console | None = None,
        eval_name: str = "dev",
    ) -> None:
        self.console = console or Console(stderr=True)
        # Plain log lines must stay one line each in CI logs and files, whatever the width.
        self._plain = {"highlight": False, "soft_wrap": True}
        self.name = name
        self.total = total_steps
        self.epochs = epochs
        self.eval_name = eval_name
        self.bar = self.console.is_terminal if show is None else show
        self.dev_acc: float | None = None
        self._progress: Progress | None = None
        self._task: Any = None
        self._epoch = 0
        self._last: tuple[float | None, float, int] | None = None  # (loss, lr, step) of the latest step, for the bar
        self._started = time.perf_counter()

    def __enter__(self) -> RunProgress:
        self._started = time.perf_counter()
        if self.bar:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self.console,
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(self.name, total=self.total, info="")
        else:
            steps = f"{self.total} steps" if self.total is not None else "steps until the time budget"
            epochs = f" over {self.epochs} epoch(s)" if self.epochs is not None else ""
            self.console.print(f"{self.name}: {steps}{epochs}", **self._plain)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def _info(self, loss: float | None, lr: float, step: int) -> str:
        rate = step / max(time.perf_counter() - self._started, 1e-9)
        dev = f" {self.eval_name} {100 * self.dev_acc:.2f}" if self.dev_acc is not None else ""
        epoch = f"ep {self._epoch}/{self.epochs} " if self.epochs is not None else ""
        shown = f"{loss:.4f}" if loss is not None else "–"
        return f"{epoch}loss {shown} lr {lr:.2e} {rate:.1f} it/s{dev}"

    def step(self, step: int, loss: float | None, lr: float) -> None:
        """`loss`: the latest the loop has read (training reads its device values once per logging window), None
        before the first read."""
        self._last = (loss, lr, step)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, info=self._info(loss, lr, step))

    def log(self, record: dict[str, Any]) -> None:
        if self._progress is None:
            info = self._info(record["loss"], record["lr"], record["step"])
            total = f"/{self.total}" if self.total is not None else ""
            self.console.print(f"{self.name} step {record['step']}{total} {info}", **self._plain)

    def evaluated(self, accuracy: float) -> None:
        self.dev_acc = accuracy
        if self._progress is None:
            where = f"epoch {self._epoch}" if self.epochs is not None else f"step {self._last[2] if self._last else 0}"
            self.console.print(f"{self.name} {where}: {self.eval_name} accuracy {100 * accuracy:.2f}", **self._plain)
        else:
            # Refresh the bar now: otherwise the new accuracy shows only at the next step, and never after the
            # last evaluation (the bar stops with the previous one).
            epoch = f"ep {self._epoch}/{self.epochs} " if self.epochs is not None else ""
            info = self._info(*self._last) if self._last else f"{epoch}{self.eval_name} {100 * accuracy:.2f}"
            self._progress.update(self._task, info=info)


def short_duration(seconds: float) -> str:
    """`42s`, `3m07s`, `2h05m`: a sweep's progress lines, ETAs and run ages."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def long_duration(seconds: float) -> str:
    """`42.0 s`, `3.1 min`, `2.08 h`, or `–` where nothing was measured: the report's cost table."""
    if not math.isfinite(seconds):
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
