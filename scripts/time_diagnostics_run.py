"""What the diagnostics add to a training run: results/bench/diagnostics-run-cost.{json,md}.

Trains `configs/smoke.yaml` with the diagnostics off and on (the default block: `when: end`, the best and the final
model), and with `--every-eval` also with `when: every_eval`, one run after the other in this process. Each run's
own summary separates the time: `train_wall_time_s` (training steps only) and `diagnostics_wall_time_s`; their
ratio is taken within one run, so it holds however the load of this shared machine moved between runs. The whole
runs' wall times are recorded too, but they differ by the load as much as by the diagnostics. The runs must train
identically (same losses, same dev accuracies): the script checks it.

    python scripts/time_diagnostics_run.py [--every-eval] [--epochs N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _bench_common import (
    ASSETS,
    REPO,
    TOKENIZER_DIR,
    command_line,
    finish_info,
    machine_info,
    machine_markdown,
    write_outputs,
)

from clue_adv.config import RunConfig, load_config
from clue_adv.rundir import read_jsonl
from clue_adv.train import train

TIMING = {"step_time_s", "diag/wall_time_s"}


def _smoke_config(*overrides: str) -> RunConfig:
    """configs/smoke.yaml, its relative paths (the bundled data and tokenizer) made absolute."""
    paths = [f"data.path={ASSETS / 'tnews'}", f"model.name_or_path={TOKENIZER_DIR}"]
    return load_config(REPO / "configs" / "smoke.yaml", [*paths, *overrides])


def _run(name: str, overrides: list[str], root: Path) -> dict[str, Any]:
    cfg = _smoke_config(*overrides, f"output_dir={root / str(len(list(root.iterdir())))}")
    start = time.perf_counter()
    outcome = train(cfg, show_progress=False)
    wall = time.perf_counter() - start
    s = outcome.summary
    lines = read_jsonl(outcome.directory / "metrics.jsonl")
    training = [{k: v for k, v in r.items() if k not in TIMING} for r in lines if r["type"] != "diagnostics"]
    return {
        "name": name,
        "overrides": overrides,
        "run_wall_s": round(wall, 2),
        "train_wall_time_s": round(s["train_wall_time_s"], 2),
        "diagnostics_wall_time_s": round(s["diagnostics_wall_time_s"], 2) if "diagnostics_wall_time_s" in s else None,
        "diagnostic_calls": [
            {"model": r["model"], "step": r["step"], "wall_s": round(r["diag/wall_time_s"], 2)}
            for r in lines
            if r["type"] == "diagnostics"
        ],
        "best_dev_accuracy": s["best_dev_accuracy"],
        "best_epoch": s["best_epoch"],
        "_training_lines": training,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every-eval", action="store_true", help="also a run with diagnostics.when=every_eval")
    parser.add_argument("--epochs", type=int, help="override the smoke config's epochs (default: its own, 4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the other benchmarks: one thread is steadier on a shared 2-core machine
    info = machine_info(torch.device("cpu"), command_line(__file__, argv))
    common = [f"epochs={args.epochs}"] if args.epochs else []
    variants = {
        "off": ["diagnostics.enabled=false"],
        "on (when: end, the default)": [],
    }
    if args.every_eval:
        variants["on (when: every_eval)"] = ["diagnostics.when=every_eval"]
    with tempfile.TemporaryDirectory(prefix="clue-adv-diag-run-") as tmp:
        runs = [_run(name, [*common, *overrides], Path(tmp)) for name, overrides in variants.items()]
    finish_info(info)
    same_training = all(r["_training_lines"] == runs[0]["_training_lines"] for r in runs)
    for r in runs:
        del r["_training_lines"]
        if r["diagnostics_wall_time_s"] is not None:
            r["diagnostics_share_of_training"] = round(r["diagnostics_wall_time_s"] / r["train_wall_time_s"], 4)
    payload = {"machine": info, "identical_training": same_training, "runs": runs}

    md = ["# What the diagnostics add to a run of the smoke config", "", *machine_markdown(info), ""]
    md += [
        "Each run's `train_wall_time_s` (training steps only) and `diagnostics_wall_time_s` come from its own "
        "summary.json; the share is their ratio within that run. The machine is shared with other jobs, so the "
        "whole-run times of different runs move with its load as much as with the diagnostics.",
        "",
        "| run | diagnostics calls | diagnostics s | training s | diagnostics / training | whole run s |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        diag = r["diagnostics_wall_time_s"]
        share = f"{100 * r['diagnostics_share_of_training']:.1f}%" if diag is not None else "–"
        md.append(
            f"| {r['name']} | {len(r['diagnostic_calls'])} | {diag if diag is not None else '–'} | "
            f"{r['train_wall_time_s']} | {share} | {r['run_wall_s']} |"
        )
    md += [
        "",
        f"- Training identical with and without diagnostics (every train and eval line): **{same_training}**.",
        f"- Best dev accuracy {100 * runs[0]['best_dev_accuracy']:.2f}% at epoch {runs[0]['best_epoch']}.",
    ]
    for r in runs[1:]:
        calls = ", ".join(f"{c['model']} (step {c['step']}) {c['wall_s']} s" for c in r["diagnostic_calls"])
        md.append(f"- {r['name']}: {calls}.")
    write_outputs("diagnostics-run-cost", payload, "\n".join(md) + "\n")
    print("\n".join(md))
    print(json.dumps([{k: r[k] for k in ("name", "diagnostics_wall_time_s", "train_wall_time_s")} for r in runs]))
    if not same_training:
        raise SystemExit("the runs did not train identically: diagnostics changed training")


if __name__ == "__main__":
    main()
