"""Estimate the CPU time of the proxy study's sweeps from what its runs so far measured.

Measured inputs (nothing assumed but the arithmetic):
- **Seconds per epoch, per strategy**: from every completed run under the given results folders (the selection
  sweep's, and the final sweeps' as they complete): the median over a strategy's runs of `train_wall_time_s`
  (the sum of its step times) per epoch trained. These runs shared the machine with one other run (`--jobs 2`),
  so the figures are per-run times at `--jobs 2`, and the sweep's wall time is the sum over runs divided by 2.
- **Per-epoch overhead** (evaluation, checkpoint, start-up spread over the epochs): the median over all
  completed runs of (finished − started − train time − diagnostics time) / epochs. A median, because a run
  that shared the machine with something else (or was resumed) has an inflated wall time.
- **Diagnostics**: the median `diagnostics_wall_time_s` per example measured, times the sweep's
  `diagnostics.examples`.
- **Strategies no run has measured yet** (tier 2): none's seconds per epoch times the strategy's step-time ratio
  to `none` from results/bench/strategies-cpu.json (scripts/bench_strategies.py, the same tiny model at a fixed
  128-token batch): flagged `ratio` in the table. The proxy's titles are short (64-token cap), where the fixed
  per-step costs weigh more, so these may overstate.
- **Epochs**: each cell's `epochs` from the sweep's plan (no early stopping in the final sweeps).
- **Spent so far** (measured, not estimated): over a sweep's completed runs, the sum of their training time
  (`train_wall_time_s`, which adds up across resumes) and diagnostics time, plus the per-epoch overhead above for
  their evaluations. Each `--jobs 2` run has one core to itself, so run-hours are CPU-hours.

    python scripts/proxy_cost.py --results results/proxy-tnews-select results/proxy-tnews \\
        --sweep sweeps/proxy-tnews.yaml --sweep sweeps/proxy-tnews-tier2.yaml --out results/proxy-tnews/cost-estimate
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import yaml  # noqa: E402
from _bench_common import REPO, machine_markdown, publish  # noqa: E402

from clue_adv.sweep import load_plan  # noqa: E402

JOBS = 2


def strategy_key(config: dict[str, Any]) -> str:
    """What costs the same per step: the strategy, its target and mode (a GP's exact vs finite difference)."""
    strategy = config["strategy"]
    key = strategy["name"]
    for field in ("mode", "target"):
        if strategy.get(field) not in (None, "embedding_output"):
            key += f"[{strategy[field]}]"
    return key


def _epochs(summary: dict[str, Any]) -> int:
    return len(summary.get("dev_history") or []) or int(summary["epochs"])


def measured(folders: list[Path]) -> tuple[dict[str, list[float]], list[float], list[float]]:
    per_epoch: dict[str, list[float]] = defaultdict(list)
    overheads, diag_per_example = [], []
    for summary_path in sorted(p for folder in folders for p in folder.rglob("summary.json")):
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
        if summary.get("status") != "completed" or not summary.get("train_wall_time_s"):
            continue
        config = yaml.safe_load((summary_path.parent / "config.yaml").read_text(encoding="utf-8"))
        epochs = _epochs(summary)
        per_epoch[strategy_key(config)].append(summary["train_wall_time_s"] / epochs)
        diagnostics = summary.get("diagnostics_wall_time_s") or 0.0
        if diagnostics:
            diag_per_example.append(diagnostics / config["diagnostics"]["examples"])
        started, finished = summary.get("started_at"), summary.get("finished_at")
        if started and finished:
            wall = (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
            overheads.append(max(0.0, wall - summary["train_wall_time_s"] - diagnostics) / epochs)
    return per_epoch, overheads, diag_per_example


def spent(directory: Path, overhead_s_per_epoch: float) -> float:
    """A completed run's measured compute: training (summed over resumes) + diagnostics + evaluation overhead."""
    summary = json.loads((directory / "summary.json").read_text(encoding="utf-8"))
    return (
        summary.get("train_wall_time_s", 0.0)
        + (summary.get("diagnostics_wall_time_s") or 0.0)
        + _epochs(summary) * overhead_s_per_epoch
    )


def estimate(args: argparse.Namespace) -> dict[str, Any]:
    per_epoch, overheads, diag_per_example = measured(args.results)
    if "none" not in per_epoch:
        sys.exit("no completed `none` run under --results: nothing to scale from")
    bench = json.loads(args.bench.read_text(encoding="utf-8"))["strategies"]
    overhead = statistics.median(overheads) if overheads else 0.0
    diag_rate = statistics.median(diag_per_example) if diag_per_example else 0.0
    sweeps = []
    for sweep_path in args.sweep:
        plan = load_plan(sweep_path, output_dir=args.output_root)
        rows: dict[str, dict[str, Any]] = {}
        for cell in plan.cells:
            cfg = cell.config
            key = strategy_key(cfg.model_dump(mode="json"))
            if key in per_epoch:
                seconds, source = statistics.median(per_epoch[key]), f"measured ({len(per_epoch[key])} runs)"
            else:
                bench_key = f"{cfg.strategy.name}[{cfg.strategy.mode}]" if hasattr(cfg.strategy, "mode") else key
                ratio = bench.get(bench_key, bench.get(cfg.strategy.name, {})).get("ratio_to_none")
                if ratio is None:
                    sys.exit(f"{key}: no measured run and no step ratio in {args.bench}")
                seconds, source = statistics.median(per_epoch["none"]) * ratio, f"ratio {ratio:.2f} × none"
            diagnostics = diag_rate * cfg.diagnostics.examples if cfg.diagnostics.enabled else 0.0
            run_s = cfg.epochs * (seconds + overhead) + diagnostics
            tag = cell.directory.parent.name
            row = rows.setdefault(
                tag,
                {
                    "strategy": tag,
                    "source": source,
                    "s_per_epoch": seconds,
                    "runs": 0,
                    "epochs": cfg.epochs,
                    "run_s": run_s,
                    "total_s": 0.0,
                    "done": 0,
                    "spent_s": 0.0,
                },
            )
            row["runs"] += 1
            row["total_s"] += run_s
            row["done"] += int(cell.done)
            row["spent_s"] += spent(cell.directory, overhead) if cell.done else 0.0
        total = sum(r["total_s"] for r in rows.values())
        spent_s = sum(r["spent_s"] for r in rows.values())
        left = sum(r["total_s"] * (r["runs"] - r["done"]) / r["runs"] for r in rows.values())
        sweeps.append(
            {
                "sweep": str(sweep_path),
                "rows": list(rows.values()),
                "cpu_s": total,
                "wall_s_at_jobs_2": total / JOBS,
                "left_wall_s_at_jobs_2": left / JOBS,
                "spent_cpu_s": spent_s,
                "done": sum(r["done"] for r in rows.values()),
            }
        )
    return {"overhead_s_per_epoch": overhead, "diagnostics_s_per_example": diag_rate, "sweeps": sweeps}


def render(payload: dict[str, Any]) -> str:
    lines = ["# The proxy study's CPU time, estimated from its own runs", ""]
    lines += machine_markdown(payload["machine"])
    lines += [
        "",
        f"Per-epoch overhead (evaluation, checkpoint, start-up): {payload['overhead_s_per_epoch']:.1f} s; "
        f"diagnostics: {payload['diagnostics_s_per_example'] * 1000:.1f} s per 1,000 examples measured. "
        f"Seconds are per run while another run shares the 2 cores (`--jobs {JOBS}`); a sweep's wall time is the "
        f"sum over its runs / {JOBS}.",
    ]
    for sweep in payload["sweeps"]:
        lines += [
            "",
            f"## {sweep['sweep']}",
            "",
            "| strategy | s per epoch (training) | from | runs | epochs | one run, h | all runs, h | done |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in sweep["rows"]:
            lines.append(
                f"| {r['strategy']} | {r['s_per_epoch']:.0f} | {r['source']} | {r['runs']} | {r['epochs']} | "
                f"{r['run_s'] / 3600:.2f} | {r['total_s'] / 3600:.1f} | {r['done']} |"
            )
        lines += [
            "",
            f"Total: {sweep['cpu_s'] / 3600:.1f} run-hours = **{sweep['wall_s_at_jobs_2'] / 3600:.1f} h of wall time "
            f"at `--jobs {JOBS}`** on this machine; left to run: {sweep['left_wall_s_at_jobs_2'] / 3600:.1f} h.",
            "",
            f"Spent so far (measured): {sweep['done']} completed run(s), **{sweep['spent_cpu_s'] / 3600:.2f} "
            f"CPU-hours** (training + diagnostics + evaluation).",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", nargs="+", type=Path, required=True, help="folders of completed runs to measure")
    p.add_argument("--sweep", action="append", type=Path, required=True, help="a sweep file to estimate (repeat)")
    p.add_argument("--output-root", type=Path, default=REPO / "results", help="where the sweeps' runs live")
    p.add_argument("--bench", type=Path, default=REPO / "results" / "bench" / "strategies-cpu.json")
    p.add_argument("--out", type=Path, help="write OUT.md and OUT.json (default: print only)")
    args = p.parse_args(argv)
    payload = estimate(args)
    publish(payload, render, "scripts/proxy_cost.py", argv, args.out)


if __name__ == "__main__":
    main()
