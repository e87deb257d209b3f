"""Errors meant for people: each carries a message that names what is wrong, and an exit code."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any


class ClueAdvError(Exception):
    """A user-facing error: bad config, missing file, bad data. The CLI prints it without a traceback."""

    exit_code = 2

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.problems = problems or []

    def __str__(self) -> str:
        if not self.problems:
            return self.message
        return self.message + "\n" + "\n".join(f"  - {p}" for p in self.problems)


class ConfigError(ClueAdvError):
    """The configuration is invalid; `problems` lists every problem found, not only the first."""


class DataError(ClueAdvError):
    """A data file is missing, malformed, or has a label outside labels.json."""


class RunFailed(ClueAdvError):
    """A run started but could not finish (non-finite loss, out of memory); its summary says why."""

    exit_code = 1


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def handle_sigint() -> None:
    """Make SIGINT raise KeyboardInterrupt even when this process inherited it as ignored.

    A shell starts background jobs (`clue-adv sweep ... &` in a script, a CI runner) with SIGINT ignored, and
    Python keeps that. For `train` and `sweep` that is right (Ctrl-C in the terminal is not for them; SIGTERM
    still stops them), but a sweep's worker is stopped by SIGINT alone (the sweep forwards it, and the kernel
    sends it when the sweep dies): ignored, the worker would train on after its sweep is gone."""
    with contextlib.suppress(ValueError):  # not the main thread: no handler can be installed
        signal.signal(signal.SIGINT, signal.default_int_handler)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`, `timeout`, a scheduler's time limit) stops a run like Ctrl-C: it is marked interrupted
    with whole files, instead of dying mid-write and staying 'running'. Outside the main thread, no handler."""
    previous = None
    with contextlib.suppress(ValueError):
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM until the block has finished, then deliver them: a block that must not stop half-way
    (an optimizer update and the step counter that goes with it) ends whole, so what is saved on an interrupt is a
    state a run can resume from. Outside the main thread (where no signal handler runs), nothing is held."""
    held: list[int] = []

    def hold(signum: int, frame: Any) -> None:
        held.append(signum)

    try:
        previous = {s: signal.signal(s, hold) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if held:
            signal.raise_signal(held[0])  # now, to the handler that was there before
