"""Time README's smoke commands on this machine and keep what they printed: results/bench/smoke-<device>.{json,md}.

Runs, each into a fresh temporary output directory so nothing is skipped as already done:
  1. `clue-adv train --config configs/smoke.yaml`          (the single smoke run)
  2. `clue-adv sweep --config sweeps/smoke.yaml`           (README's first command after the install)
and records their wall times, the single run's dev accuracy, and the sweep's comparison table (from its report.md).
Wall times on a shared CPU depend on the load: the load average is recorded beside them.

    python scripts/time_smoke.py [--skip-sweep]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _bench_common import REPO, command_line, finish_info, machine_info, machine_markdown, write_outputs


def _run(args: list[str]) -> tuple[float, str]:
    """Run `clue-adv ARGS` from the repository root; (wall seconds, stdout). Any failure stops the script."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "clue_adv", *args], cwd=REPO, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"clue-adv {' '.join(args)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds, done.stdout


def _best_epoch_table(report: Path) -> str:
    """The first table of report.md (dev accuracy at the best epoch), as markdown lines."""
    lines = report.read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("### Dev accuracy at the best epoch"))
    table = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return "\n".join(table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-sweep", action="store_true", help="time only the single run")
    args = parser.parse_args(argv)
    info = machine_info(torch.device("cpu"), command_line(__file__, argv))
    payload: dict = {"machine": info}
    with tempfile.TemporaryDirectory(prefix="clue-adv-smoke-") as tmp:
        seconds, _ = _run(["train", "--config", "configs/smoke.yaml", "--output-dir", f"{tmp}/train"])
        summary = json.loads(next(Path(tmp, "train").rglob("summary.json")).read_text())
        payload["train"] = {
            "command": "clue-adv train --config configs/smoke.yaml",
            "wall_seconds": round(seconds, 1),
            "train_wall_seconds": round(summary.get("train_wall_time_s") or 0.0, 1),
            "steps": summary.get("steps"),
            "best_dev_accuracy": summary.get("best_dev_accuracy"),
        }
        if not args.skip_sweep:
            seconds, _ = _run(["sweep", "--config", "sweeps/smoke.yaml", "--output-dir", f"{tmp}/sweep"])
            report = next(Path(tmp, "sweep").rglob("report.md"))
            payload["sweep"] = {
                "command": "clue-adv sweep --config sweeps/smoke.yaml",
                "wall_seconds": round(seconds, 1),
                "table": _best_epoch_table(report),
            }
    finish_info(info)

    md = ["# README's smoke commands, timed", "", *machine_markdown(info), ""]
    t = payload["train"]
    md += [
        f"- `{t['command']}`: {t['wall_seconds']} s wall, of which training {t['train_wall_seconds']} s "
        f"({t['steps']} steps; dev accuracy {100 * t['best_dev_accuracy']:.2f}% at the best epoch)"
    ]
    if "sweep" in payload:
        s = payload["sweep"]
        md += [f"- `{s['command']}`: {s['wall_seconds']} s wall (6 runs, one at a time)", "", "Its table:", ""]
        md += [s["table"]]
    write_outputs("smoke-cpu", payload, "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
