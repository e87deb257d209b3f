"""Would early stopping have found each run's best dev epoch? Replayed on runs that trained every epoch.

For every completed run under the given folders that trained all its configured epochs with one evaluation per
epoch and no early stopping (its whole dev curve is in summary.json's `dev_history`), the rule of
`eval.early_stopping` is replayed on that curve for each patience asked: an evaluation improves when its accuracy
beats the reference by more than `--min-delta` (the reference moves only then); the run stops after `patience`
evaluations in a row without improvement, keeping the best accuracy seen so far. Compared with the full run:
- **found**: the stopped run's best epoch is the full run's best epoch;
- **lost**: the full run's best accuracy minus the stopped run's (points; 0 when found);
- **saved**: the share of the run's epochs not trained.
Also reported: each run's epochs to its best, which the reproduction estimate (scripts/estimate_reproduce.py
--early-stopping) uses instead of an assumption.

    python scripts/early_stopping_fidelity.py results/proxy-tnews --out results/proxy-tnews/early-stopping
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench_common import machine_markdown, publish  # noqa: E402


def replay(accuracies: list[float], patience: int, min_delta: float = 0.0) -> int:
    """The number of epochs a run with this dev curve trains under early stopping (1-based stop epoch)."""
    reference, without = None, 0
    for epoch, accuracy in enumerate(accuracies, start=1):
        if reference is None or accuracy > reference + min_delta:
            reference, without = accuracy, 0
        else:
            without += 1
            if without >= patience:
                return epoch
    return len(accuracies)


def full_curves(folders: list[Path]) -> list[dict[str, Any]]:
    runs = []
    for path in sorted(p for folder in folders for p in folder.rglob("summary.json")):
        summary = json.loads(path.read_text(encoding="utf-8"))
        history = summary.get("dev_history") or []
        if (
            summary.get("status") != "completed"
            or summary.get("stopped_early_at_epoch") is not None
            or len(history) != summary.get("epochs")
            or [h["epoch"] for h in history] != list(range(1, len(history) + 1))
        ):
            continue  # a curve cut short, or evaluated more than once per epoch: nothing to replay exactly
        runs.append(
            {
                "run": str(path.parent),
                "strategy": summary.get("strategy_tag") or summary.get("strategy"),
                "accuracies": [h["accuracy"] for h in history],
            }
        )
    return runs


def analyse(runs: list[dict[str, Any]], patiences: list[int], min_delta: float) -> dict[str, Any]:
    rows = []
    for run in runs:
        acc = run["accuracies"]
        best = max(range(len(acc)), key=lambda i: (acc[i], -i))  # first epoch of the maximum, as training keeps
        run["best_epoch"] = best + 1
        run["epochs"] = len(acc)
        for p in patiences:
            stop = replay(acc, p, min_delta)
            kept = max(range(stop), key=lambda i: (acc[i], -i))
            run[f"patience_{p}"] = {
                "stop_epoch": stop,
                "kept_epoch": kept + 1,
                "found": kept == best,
                "lost_points": 100 * (acc[best] - acc[kept]),
                "saved_share": (len(acc) - stop) / len(acc),
            }
    for p in patiences:
        results = [r[f"patience_{p}"] for r in runs]
        rows.append(
            {
                "patience": p,
                "runs": len(results),
                "found": sum(r["found"] for r in results),
                "mean_lost_points": statistics.mean(r["lost_points"] for r in results) if results else None,
                "max_lost_points": max((r["lost_points"] for r in results), default=None),
                "mean_saved_share": statistics.mean(r["saved_share"] for r in results) if results else None,
            }
        )
    return {"patience": rows, "runs": runs, "min_delta": min_delta}


def render(payload: dict[str, Any]) -> str:
    lines = ["# Early stopping replayed on full runs: would it have found the best dev epoch?", ""]
    lines += machine_markdown(payload["machine"])
    lines += [
        "",
        f"{len(payload['runs'])} runs that trained every epoch; the rule replayed with min_delta "
        f"{payload['min_delta']}. found = the stopped run keeps the full run's best epoch; lost = full best − kept "
        "(accuracy points); saved = share of epochs not trained.",
        "",
        "| patience | runs | found | mean lost (points) | max lost | mean epochs saved |",
        "|---|---|---|---|---|---|",
    ]
    for r in payload["patience"]:
        if not r["runs"]:
            continue
        lines.append(
            f"| {r['patience']} | {r['runs']} | {r['found']} | {r['mean_lost_points']:.2f} | "
            f"{r['max_lost_points']:.2f} | {100 * r['mean_saved_share']:.0f}% |"
        )
    patiences = [r["patience"] for r in payload["patience"]]
    lines += [
        "",
        "| run | strategy | epochs | best epoch | " + " | ".join(f"p={p} stop → kept" for p in patiences) + " |",
    ]
    lines.append("|---" * (4 + len(patiences)) + "|")
    for run in payload["runs"]:
        cells = [f"{run[f'patience_{p}']['stop_epoch']} → {run[f'patience_{p}']['kept_epoch']}" for p in patiences]
        lines.append(
            f"| {run['run']} | {run['strategy']} | {run['epochs']} | {run['best_epoch']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="folders holding run directories")
    p.add_argument("--patience", type=int, nargs="+", default=[1, 2, 3, 5])
    p.add_argument("--min-delta", type=float, default=0.0)
    p.add_argument("--out", type=Path, help="write OUT.md and OUT.json (default: print only)")
    args = p.parse_args(argv)
    runs = full_curves(args.folders)
    if not runs:
        sys.exit(
            "no completed run that trained every epoch without early stopping under "
            + ", ".join(map(str, args.folders))
        )
    payload = analyse(runs, args.patience, args.min_delta)
    publish(payload, render, "scripts/early_stopping_fidelity.py", argv, args.out)


if __name__ == "__main__":
    main()
