"""The proxy study's findings table: one row per strategy, what README's "What we found" quotes.

Read from the run directories with the report's own statistics (clue_adv.report: mean ± sample std over seeds,
paired Δ vs the baseline with a 95% t-interval and Holm-adjusted p), beside the dev peak, the diagnostics the
study's argument speaks of (input-gradient norm, its scale-free form ‖x‖·‖∇ₓℓ‖, the embedding norm, accuracy under
a small FGM attack, the train − dev gap) and the step time. Nothing here is typed by hand: rerun it after every
completed run.

    python scripts/study_findings.py results/proxy-tnews --out results/proxy-tnews/findings
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import machine_markdown, publish  # noqa: E402

from clue_adv.report import build_diagnostics, collect_runs  # noqa: E402
from clue_adv.report.diagnostics import EMBEDDING_NORM, GRAD_NORM, SCALE_FREE_GRAD_NORM  # noqa: E402
from clue_adv.report.tables import build_tables, finite  # noqa: E402
from clue_adv.stats import summarize  # noqa: E402

ATTACK = "diag/dev/fgm_accuracy/eps=0.1"
GAP = "diag/gap/accuracy"
READINGS = ("best", "final")  # the report's metrics (clue_adv.report.tables.METRICS) this table shows
# (summary key, column) of the diagnostics shown: mean over seeds, and the paired Δ vs the baseline
DIAGNOSTICS = {
    GRAD_NORM: "‖∇ₓℓ‖",
    EMBEDDING_NORM: "‖x‖",
    SCALE_FREE_GRAD_NORM: "‖x‖·‖∇ₓℓ‖",
    ATTACK: "acc. under FGM ε=0.1 (%)",
    GAP: "train − dev acc. (pp)",
}


def _interval(test: Any, p_holm: float | None) -> dict[str, Any] | None:
    if test is None:
        return None
    return {
        "mean": finite(test.mean_difference),
        "ci": [finite(test.ci_low), finite(test.ci_high)],
        "n": test.n,
        "p_holm": finite(p_holm) if p_holm is not None else None,
        "seeds_positive": None,
    }


def findings(root: Path, experiment: str | None) -> dict[str, Any]:
    runs = collect_runs(root)
    tables = [t for t in build_tables(runs) if experiment is None or t.experiment == experiment]
    if not tables:
        sys.exit(f"{root}: no run directories" + (f" of experiment {experiment!r}" if experiment else ""))
    if len(tables) > 1:
        sys.exit(f"{root}: {len(tables)} experiments; name one with --experiment")
    table = tables[0]
    dt = build_diagnostics(table, "best")
    rows = []
    for task in table.tasks:
        base = table.cell(task, table.baseline) if table.baseline else None
        for tag in table.tags:
            cell = table.cell(task, tag)
            if cell is None or not cell.completed:
                continue
            row: dict[str, Any] = {"task": task, "strategy": tag, "seeds": sorted(cell.values["best"])}
            # Both readings of every run: the study's (best dev epoch) and CLUE's (final epoch), each with its own
            # paired Δ and count of seeds above the baseline, so a CLUE-protocol folder's table is this one too.
            for metric in READINGS:
                values = cell.values.get(metric, {})
                accuracy = summarize(list(values.values()))
                row[metric] = {"mean": finite(accuracy.mean), "std": finite(accuracy.std)}
                delta = _interval(cell.delta.get(metric), cell.p_holm.get(metric))
                if base is not None and tag != table.baseline and delta is not None:
                    base_values = base.values.get(metric, {})
                    delta["seeds_positive"] = sum(values[s] > base_values[s] for s in set(values) & set(base_values))
                row[f"{metric}_delta"] = delta
            row |= {
                "best_epoch": {
                    "median": statistics.median(cell.best_epochs) if cell.best_epochs else None,
                    "range": [min(cell.best_epochs), max(cell.best_epochs)] if cell.best_epochs else None,
                },
                "best_minus_final": finite(summarize(cell.best_minus_final).mean),
                "step_time_ratio": finite(cell.step_time_ratio),
                "diagnostics": {},
            }
            diag = dt.cell(task, tag) if dt is not None else None
            for key in DIAGNOSTICS:
                values = diag.values.get(key, {}) if diag is not None else {}
                if not values:
                    continue
                comparison = diag.comparisons.get(key)
                row["diagnostics"][key] = {
                    "mean": finite(summarize(list(values.values())).mean),
                    "delta": _interval(comparison.test, comparison.p_holm) if comparison is not None else None,
                }
            rows.append(row)
    return {"results": str(root), "experiment": table.experiment, "baseline": table.baseline, "rows": rows}


def _num(x: float | None, digits: int = 2, sign: bool = False) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    return f"{x:+.{digits}f}" if sign else f"{x:.{digits}f}"


def _delta(d: dict[str, Any] | None, digits: int = 2) -> str:
    if d is None:
        return "baseline"
    p = d["p_holm"]
    p_text = "–" if p is None else ("p<0.001" if p < 0.001 else f"p={p:.3f}")
    low, high = (_num(x, digits, True) for x in d["ci"])
    return f"{_num(d['mean'], digits, True)} [{low}, {high}] {p_text}"


def render(payload: dict[str, Any]) -> str:
    lines = [f"# What the proxy study found: `{payload['results']}`", ""]
    lines += machine_markdown(payload["machine"])
    header = ["strategy", "seeds"]
    for metric in READINGS:
        header += [
            f"{metric}-epoch dev acc. (%)",
            f"{metric}-epoch Δ vs {payload['baseline']} (pp) [95% CI] Holm p",
            "seeds above",
        ]
    header += [
        "best epoch: median (range)",
        "best − final (pp)",
        *DIAGNOSTICS.values(),
        "step time × none",
    ]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in payload["rows"]:
        epoch = r["best_epoch"]
        cells = [r["strategy"], str(len(r["seeds"]))]
        for metric in READINGS:
            delta = r[f"{metric}_delta"]
            above = delta["seeds_positive"] if delta else None
            cells += [
                f"{_num(r[metric]['mean'])} ± {_num(r[metric]['std'])}",
                _delta(delta),
                "–" if above is None else f"{above}/{delta['n']}",
            ]
        cells += [
            "–" if epoch["median"] is None else f"{epoch['median']:g} ({epoch['range'][0]}–{epoch['range'][1]})",
            _num(r["best_minus_final"]),
        ]
        for key in DIAGNOSTICS:
            d = r["diagnostics"].get(key)
            digits = 1 if key in (ATTACK, GAP, SCALE_FREE_GRAD_NORM) else 2
            if d is None:
                cells.append("–")
            elif d["delta"] is None:
                cells.append(_num(d["mean"], digits))
            else:
                cells.append(f"{_num(d['mean'], digits)} (Δ {_num(d['delta']['mean'], digits, True)})")
        cells.append(_num(r["step_time_ratio"]))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Accuracies: the official dev set (10,000 examples), at each run's best dev epoch (the study's reading) and at "
        "its final epoch (CLUE's); mean ± sample std over seeds. Δ: mean paired difference "
        "vs the baseline over shared seeds, 95% t-interval, paired t-test p Holm-adjusted across the strategies "
        "(the report's, `report.md`); seeds above: seeds where the strategy beat the baseline's run of the same "
        "seed. Diagnostics of each run's best model on a fixed 1,000-example dev subset (train subset for the "
        "gap): mean over seeds and, in brackets, the mean paired Δ vs the baseline; ε relative to each example's "
        "embedding norm. Step time: per optimizer step, ratio to the baseline's, runs sharing 2 cores two at a time.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", type=Path, help="an experiment folder of completed runs (results/proxy-tnews)")
    p.add_argument("--experiment", help="which experiment, when the folder holds several")
    p.add_argument("--out", type=Path, help="write OUT.md and OUT.json (default: print only)")
    args = p.parse_args(argv)
    payload = findings(args.results, args.experiment)
    publish(payload, render, "scripts/study_findings.py", argv, args.out)


if __name__ == "__main__":
    main()
