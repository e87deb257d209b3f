"""How an experiment's runs were made, for the report: the sweep commands that ran them (the sweep manifest's
record), the code and library versions, the machines, the period, and the compute the completed runs took — so
that a results folder says what produced it without its author's notes."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from clue_adv.report.tables import ExperimentTable

# A run's time in three parts, each summed over its sessions (summary.json); nothing else it spends is timed.
TIME_PARTS = {
    "train_wall_time_s": "training",
    "eval_wall_time_s": "evaluation",
    "diagnostics_wall_time_s": "diagnostics",
}


def _when(stamp: Any) -> str:
    """An ISO timestamp as `YYYY-MM-DD HH:MM` UTC ('?' when missing or unreadable)."""
    try:
        return datetime.fromisoformat(str(stamp)).strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return "?"


def _machine(host: Any, device: Any = None) -> str:
    if not isinstance(host, dict):
        return str(device) if device else "not recorded"
    cores = f", {host['cpu_cores']} cores" if host.get("cpu_cores") else ""
    gpu = f"{device} on " if device and not str(device).startswith("cpu") else ""
    return f"{gpu}{host.get('cpu', '?')}{cores}"


def _commands(invocations: list[dict[str, Any]]) -> list[str]:
    """One line per distinct command and machine, in the order they first ran, with how often and when."""
    groups: dict[tuple[str, str], list[str]] = {}
    for item in invocations:
        if not item.get("command"):  # a manifest from before the command line was recorded
            key = (f"`{item.get('sweep')}`", "")
        else:
            jobs = f", --jobs {item['jobs']}" if item.get("jobs") else ""
            key = (f"`{item['command']}`", f"{_machine(item.get('host'))}{jobs}")
        groups.setdefault(key, []).append(_when(item.get("at")))
    lines = []
    for (command, where), times in groups.items():
        if not where:
            lines.append(
                f"  - {command}: its command line and machine were not recorded (a sweep manifest from "
                f"before clue_adv kept them; last written {times[-1]})"
            )
            continue
        started = f"started {len(times)}×, {times[0]} → {times[-1]}" if len(times) > 1 else f"started {times[0]}"
        lines.append(f"  - {command} — {started}; {where}")
    return lines


def _counted(values: list[str]) -> str:
    return ", ".join(f"{v} ({n} run{'s' if n > 1 else ''})" for v, n in Counter(values).most_common())


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h"


def provenance_section(table: ExperimentTable, invocations: list[dict[str, Any]]) -> str | None:
    """The report's "How these runs were made" section (None when no run has started)."""
    runs = [r for r in table.runs if r.summary.get("started_at")]
    if not runs and not invocations:
        return None
    done = [r for r in runs if r.status == "completed"]
    lines = ["### How these runs were made", ""]
    if invocations:
        lines += ["- sweep commands (from sweep.json; times UTC):", *_commands(invocations)]
    if not runs:  # a sweep that has not started a run yet
        return "\n".join(lines) + "\n"
    commits = [str(r.summary.get("git_commit") or "unknown")[:9] for r in runs]
    lines.append(f"- clue_adv commit: {_counted(commits)}")
    versions = [
        ", ".join(f"{k} {v}" for k, v in sorted(r.summary["versions"].items()))
        for r in runs
        if isinstance(r.summary.get("versions"), dict)
    ]
    if versions:
        lines.append(f"- versions: {_counted(versions)}")
    lines.append(f"- machine: {_counted([_machine(r.summary.get('host'), r.summary.get('device')) for r in runs])}")
    ends = [str(r.summary["finished_at"]) for r in done if r.summary.get("finished_at")]
    starts = sorted(str(r.summary["started_at"]) for r in runs)
    lines.append(f"- period: {_when(starts[0])} → {_when(max(ends)) if ends else '…'} UTC")
    if done:
        lines.append(_compute_line(done))
    return "\n".join(lines) + "\n"


def _compute_line(done: list[Any]) -> str:
    """The completed runs' measured time: training, evaluation, diagnostics (each summed over a run's sessions)."""

    def total(key: str) -> tuple[float, int]:
        values = [float(v) for r in done if isinstance(v := r.summary.get(key), int | float)]
        return sum(values), len(values)

    parts, seconds = [], 0.0
    for key, name in TIME_PARTS.items():
        value, count = total(key)
        seconds += value
        if count == 0:
            parts.append(f"{name} not recorded")
        else:
            partial = f" ({count} of {len(done)} runs recorded it)" if count < len(done) else ""
            parts.append(f"{name} {_hours(value)}{partial}")
    line = f"- compute, {len(done)} completed run(s), summed: {_hours(seconds)} ({'; '.join(parts)})"
    threads = [r.summary["host"].get("torch_threads") for r in done if isinstance(r.summary.get("host"), dict)]
    on_cpu = all(str(r.summary.get("device", "cpu")).startswith("cpu") for r in done)
    if on_cpu and len(threads) == len(done) and all(isinstance(t, int) for t in threads):
        cpu = sum(
            t * sum(float(r.summary.get(k) or 0.0) for k in TIME_PARTS) for r, t in zip(done, threads, strict=True)
        )
        line += f"; × each run's torch threads: {_hours(cpu)} of CPU cores"
    elif on_cpu:
        line += "; each run's torch threads not recorded by all runs (run-hours, not core-hours)"
    return line
