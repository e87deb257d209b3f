"""Report plots (PNG): per-seed accuracy per strategy, dev-accuracy curves, gain vs cost; from the diagnostics,
accuracy under attack against the radius and the accuracy gain against the change in input sensitivity.

Figures are built with matplotlib's object API (`Figure` + Agg canvas), never pyplot, so nothing
global is touched and no display is needed.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from clue_adv.report.diagnostics import (
    CURVATURE,
    GRAD_NORM,
    SCALE_FREE_GRAD_NORM,
    DiagnosticsTable,
    build_diagnostics,
    mechanism_points,
    robust_curve,
)
from clue_adv.report.tables import TASK_NAMES, ExperimentTable

_SAFE = str.maketrans({c: "_" for c in '/\\:*?"<>| '})


# Beyond this many entries a legend goes beside the axes, not over the lines.
_LEGEND_INSIDE = 6
# A band of ±1 std per strategy only up to this many strategies: a dozen overlapping bands hide the means.
_BANDS_UP_TO = 4
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D")


def strategy_styles(tags: list[str]) -> dict[str, dict[str, Any]]:
    """One look per strategy, the same in every plot of an experiment: matplotlib's 10 default colours with round
    markers, then the same colours dashed with square markers, ... so that no two of a dozen strategies (both tiers
    of a study) look alike."""
    from matplotlib import rcParams

    colors = rcParams["axes.prop_cycle"].by_key()["color"]
    styles = {}
    for i, tag in enumerate(tags):
        cycle = i // len(colors)
        styles[tag] = {
            "color": colors[i % len(colors)],
            "linestyle": _LINESTYLES[cycle % len(_LINESTYLES)],
            "marker": _MARKERS[cycle % len(_MARKERS)],
        }
    return styles


def _width(base: float, entries: int) -> float:
    """Room for a legend beside the axes (_legend) when it has many entries."""
    return base + (2.2 if entries > _LEGEND_INSIDE else 0.0)


# Where an experiment has several tasks, a strategy's points differ by their fill, task by task.
_TASK_FILLS = ("full", "none", "left", "bottom")


def _strategy_points(tags: list[str], tasks: list[str]) -> Callable[[str, str, int], dict[str, Any]]:
    """The look and legend label of one strategy's point on one task, for the scatter plots. Each point is named in
    the legend, not by a label written beside it: at a dozen strategies (both tiers of a study) labels beside
    points of similar gain overlap and become unreadable."""
    styles = strategy_styles(tags)

    def look(task: str, tag: str, n: int) -> dict[str, Any]:
        name = tag if len(tasks) == 1 else f"{tag}, {_task_name(task)}"
        fill = _TASK_FILLS[tasks.index(task) % len(_TASK_FILLS)]
        style = styles[tag]
        return {"color": style["color"], "marker": style["marker"], "fillstyle": fill, "linestyle": "none",
                "markersize": 7, "label": f"{name} (n={n})"}  # fmt: skip

    return look


def _legend(ax: Any, fontsize: int = 8) -> None:
    if len(ax.get_legend_handles_labels()[0]) > _LEGEND_INSIDE:
        ax.legend(fontsize=fontsize, loc="center left", bbox_to_anchor=(1.01, 0.5), handlelength=3)
    else:
        ax.legend(fontsize=fontsize, handlelength=3)


def _legend_or_note(ax: Any, empty: str, fontsize: int = 8) -> None:
    """A grid and the legend, or, where nothing was drawn, a note saying why the panel is empty."""
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        _legend(ax, fontsize)
    else:
        ax.text(0.5, 0.5, empty, transform=ax.transAxes, ha="center", va="center")


def _save(fig: Any, path: Path) -> Path:
    """Write through a temp file and rename, like every other report file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _figure(n_panels: int, width: float = 5.0, height: float = 3.8) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * n_panels, height), layout="constrained")
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def _task_name(task: str) -> str:
    return TASK_NAMES.get(task, task)


def accuracy_by_seed(table: ExperimentTable, path: Path, metric: str = "best") -> Path:
    """Per task: a box per strategy with every seed's accuracy as a point."""
    fig, axes = _figure(len(table.tasks), width=max(4.0, 1.0 + 0.9 * len(table.tags)))
    rng = np.random.default_rng(0)  # jitter only; fixed so reruns give identical files
    styles = strategy_styles(table.tags)
    for ax, task in zip(axes, table.tasks, strict=True):
        data, labels = [], []
        for tag in table.tags:
            cell = table.cell(task, tag)
            data.append(list(cell.values[metric].values()) if cell is not None else [])
            labels.append(tag)
        positions = np.arange(1, len(data) + 1)
        filled = [i for i, d in enumerate(data) if d]
        if filled:
            ax.boxplot([data[i] for i in filled], positions=positions[filled], widths=0.5, showfliers=False)
        for pos, values, tag in zip(positions, data, labels, strict=True):
            if values:
                jitter = rng.uniform(-0.12, 0.12, len(values))
                look = {k: styles[tag][k] for k in ("color", "marker")}
                ax.scatter(pos + jitter, values, s=18, alpha=0.8, zorder=3, **look)
        ax.set_xticks(positions, labels, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(0.4, len(data) + 0.6)
        ax.set_title(_task_name(task))
        ax.set_ylabel("dev accuracy (%), best epoch" if metric == "best" else "dev accuracy (%), final epoch")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{table.experiment}: accuracy per seed")
    return _save(fig, path)


def dev_curves(table: ExperimentTable, path: Path) -> Path:
    """Per task: mean dev accuracy over seeds per evaluation, with a band of ±1 std."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(table.tasks), width=_width(5.0, len(table.tags)))
    styles = strategy_styles(table.tags)
    bands = len(table.tags) <= _BANDS_UP_TO
    for ax, task in zip(axes, table.tasks, strict=True):
        by_epoch = True
        for tag in table.tags:
            histories = [
                r.summary.get("dev_history") or []
                for r in table.runs
                if r.task == task and r.tag == tag and r.status == "completed"
            ]
            histories = [h for h in histories if h]
            if not histories:
                continue
            length = min(len(h) for h in histories)  # runs of one cell share a schedule; guard anyway
            acc = np.array([[100 * e["accuracy"] for e in h[:length]] for h in histories])
            epochs = [e["epoch"] for e in histories[0][:length]]
            by_epoch = len(set(epochs)) == length  # else several evaluations per epoch: use steps
            x = np.array(epochs if by_epoch else [e["step"] for e in histories[0][:length]])
            mean = acc.mean(axis=0)
            ax.plot(x, mean, ms=3, label=f"{tag} (n={len(histories)})", **styles[tag])
            if bands and len(histories) > 1:
                std = acc.std(axis=0, ddof=1)
                ax.fill_between(x, mean - std, mean + std, color=styles[tag]["color"], alpha=0.2, linewidth=0)
        ax.set_title(_task_name(task))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch" if by_epoch else "optimizer step")
        ax.set_ylabel("dev accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            _legend(ax, fontsize=7)
    spread = "mean ± std over seeds" if bands else "mean over seeds; the spread is in the accuracy-per-seed plot"
    fig.suptitle(f"{table.experiment}: dev accuracy over training ({spread})")
    return _save(fig, path)


def gain_vs_cost(table: ExperimentTable, path: Path, metric: str = "best") -> Path:
    """Δ accuracy vs the baseline (95% CI bars) against the step-time ratio: a point per strategy and task, in the
    strategy's look (_strategy_points)."""
    fig, axes = _figure(1, width=_width(6.0, len(table.tags) * len(table.tasks)), height=4.5)
    ax = axes[0]
    looks = _strategy_points(table.tags, table.tasks)
    for task in table.tasks:
        for tag in table.tags:
            cell = table.cell(task, tag)
            test = cell.delta.get(metric) if cell is not None else None
            if test is None or not math.isfinite(test.mean_difference) or not math.isfinite(cell.step_time_ratio):
                continue
            ci_ok = math.isfinite(test.ci_low)
            err = [
                [test.mean_difference - test.ci_low if ci_ok else 0.0],
                [test.ci_high - test.mean_difference if ci_ok else 0.0],
            ]
            ax.errorbar([cell.step_time_ratio], [test.mean_difference], yerr=err, capsize=3, **looks(task, tag, test.n))
    ax.axhline(0, color="grey", lw=0.8)
    ax.axvline(1, color="grey", lw=0.8, ls=":")
    ax.set_xlabel(f"step time × {table.baseline or 'baseline'}")
    ax.set_ylabel("Δ dev accuracy vs baseline (pp), 95% CI")
    _legend_or_note(ax, "no paired comparisons yet")
    ax.set_title(f"{table.experiment}: gain vs cost")
    return _save(fig, path)


def robust_accuracy(dt: DiagnosticsTable, path: Path) -> Path:
    """A row of panels per task, one per attack (FGM, PGD): each strategy's dev-subset accuracy (mean over seeds)
    against the relative radius ε, ε = 0 being its clean accuracy."""
    from matplotlib.figure import Figure

    methods = [m for m in ("fgm", "pgd") if any(q.method == m for q in dt.quantities)] or ["fgm", "pgd"]
    fig = Figure(figsize=(_width(5.0, len(dt.tags)) * len(methods), 3.8 * len(dt.tasks)), layout="constrained")
    grid = fig.subplots(len(dt.tasks), len(methods), squeeze=False)
    radii = [q.epsilon for q in dt.quantities if q.epsilon is not None]
    styles = strategy_styles(dt.tags)
    for row, task in zip(grid, dt.tasks, strict=True):
        for ax, method in zip(row, methods, strict=True):
            for tag in dt.tags:
                xs, ys, n = robust_curve(dt, task, tag, method)
                if len(xs) > 1:  # a clean point alone is no curve
                    ax.plot(xs, ys, ms=3, label=f"{tag} (n={n})", **styles[tag])
            if radii:  # the radii span decades (0.01 to 0.1) and start at 0: linear up to the smallest one
                ax.set_xscale("symlog", linthresh=min(radii))
            ax.set_title(f"{_task_name(task)}: {method.upper()}")
            ax.set_xlabel("ε (relative to each example's ‖x‖)")
            ax.set_ylabel(f"dev-subset accuracy (%), {dt.model} model")
            _legend_or_note(ax, "no attack recorded", fontsize=7)
    fig.suptitle(f"{dt.experiment}: accuracy under attack (mean over seeds)")
    return _save(fig, path)


def gain_vs_mechanism(table: ExperimentTable, dt: DiagnosticsTable, path: Path) -> Path:
    """The accuracy gain vs the baseline (best epoch, pp) against the change in the dev input-gradient norm, in the
    scale-free gradient norm ‖x‖·‖∇ₓℓ‖ (where runs recorded the embedding norm: a strategy that grows the
    embeddings lowers ‖∇ₓℓ‖ without flattening the loss per relative move) and in the dev input curvature, a panel
    each; one point per strategy and task, each a mean of paired differences over the seeds where both numbers exist
    (mechanism_points)."""
    panels = [(GRAD_NORM, "Δ ‖∇ₓℓ‖ (dev)"), (SCALE_FREE_GRAD_NORM, "Δ ‖x‖·‖∇ₓℓ‖ (dev)"), (CURVATURE, "Δ tr ∇ₓ²ℓ (dev)")]
    recorded = {q.key for q in dt.quantities}
    panels = [(key, what) for key, what in panels if key != SCALE_FREE_GRAD_NORM or key in recorded]
    fig, axes = _figure(len(panels), width=_width(5.5, len(dt.tags) * len(dt.tasks)), height=4.5)
    looks = _strategy_points(table.tags, dt.tasks)
    for ax, (key, what) in zip(axes, panels, strict=True):
        for p in mechanism_points(table, dt, key):
            ax.plot([p.change], [p.gain], **looks(p.task, p.tag, len(p.seeds)))
        ax.axhline(0, color="grey", lw=0.8)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlabel(f"{what} vs {dt.baseline or 'baseline'}, {dt.model} model")
        ax.set_ylabel("Δ dev accuracy vs baseline (pp), best epoch")
        _legend_or_note(ax, "not recorded in paired runs")
    fig.suptitle(f"{table.experiment}: accuracy gain vs change in input sensitivity (paired means over seeds)")
    return _save(fig, path)


def experiment_plots(table: ExperimentTable, directory: Path) -> list[tuple[str, Path]]:
    """All plots of one experiment: (title, path) pairs. The diagnostics plots only where runs recorded them."""
    stem = table.experiment.translate(_SAFE)
    out = [
        ("accuracy per seed", accuracy_by_seed(table, directory / f"{stem}-accuracy.png")),
        ("dev accuracy over training", dev_curves(table, directory / f"{stem}-curves.png")),
    ]
    if table.baseline is not None:
        out.append(("gain vs cost", gain_vs_cost(table, directory / f"{stem}-gain-cost.png")))
    dt = build_diagnostics(table, "best")
    if dt is not None:
        if any(q.method is not None for q in dt.quantities):
            out.append(("accuracy under attack", robust_accuracy(dt, directory / f"{stem}-robustness.png")))
        if table.baseline is not None and any(q.key in (GRAD_NORM, CURVATURE) for q in dt.quantities):
            path = directory / f"{stem}-gain-mechanism.png"
            out.append(("accuracy gain vs change in input sensitivity", gain_vs_mechanism(table, dt, path)))
    return out
