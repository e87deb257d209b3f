"""The regime check of the proxy study: a baseline run's learning curve, per epoch, from its run directory.

For each run directory given: mean training loss per epoch (from metrics.jsonl's train lines, weighted by the
steps each line covers), the evaluated split's accuracy and loss after each epoch, the best epoch, and whether the
run overfits (evaluation loss rising past its minimum while the training loss keeps falling). Writes
<out>.md and <out>.json with the command, machine and date.

    python scripts/proxy_regime.py results/proxy-tnews-probes/random-init... --out results/proxy-tnews/regime
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from clue_adv.rundir import read_jsonl


def curve(run: Path) -> dict[str, Any]:
    records = read_jsonl(run / "metrics.jsonl")
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    train: dict[int, list[tuple[float, int]]] = {}
    last_step = 0
    for r in records:
        if r.get("type") == "train" and isinstance(r.get("loss"), float):
            train.setdefault(r["epoch"], []).append((r["loss"], r["step"] - last_step))
            last_step = r["step"]
        elif r.get("type") == "eval":
            last_step = r["step"]
    evals = [r for r in records if r.get("type") == "eval"]
    epochs = []
    for r in evals:
        losses = train.get(r["epoch"], [])
        steps = sum(n for _, n in losses)
        epochs.append(
            {
                "epoch": r["epoch"],
                "train_loss": sum(v * n for v, n in losses) / steps if steps else None,
                "eval_accuracy": r["accuracy"],
                "eval_loss": r["loss"],
            }
        )
    best = max(epochs, key=lambda e: e["eval_accuracy"])
    min_loss = min(epochs, key=lambda e: e["eval_loss"])
    last = epochs[-1]
    return {
        "run": str(run),
        "init": config["model"]["init"],
        "model": config["model"]["name_or_path"],
        "eval_split": config["data"].get("eval_split", "dev"),
        "lr": config["optim"]["lr"],
        "schedule": config["optim"]["schedule"],
        "epochs": epochs,
        "best_epoch": best["epoch"],
        "best_accuracy": best["eval_accuracy"],
        "final_accuracy": last["eval_accuracy"],
        "eval_loss_min_epoch": min_loss["epoch"],
        "overfits": last["eval_loss"] > min_loss["eval_loss"]
        and last["train_loss"] is not None
        and last["train_loss"] < min_loss["train_loss"],
        "train_wall_time_s": summary.get("train_wall_time_s"),
    }


def render(curves: list[dict[str, Any]], header: str) -> str:
    out = [header, ""]
    for c in curves:
        out += [
            f"## {c['run']}",
            "",
            f"init {c['init']} ({c['model']}), evaluated on {c['eval_split']}, lr {c['lr']} ({c['schedule']}); "
            f"best epoch {c['best_epoch']} ({100 * c['best_accuracy']:.2f}%), final {100 * c['final_accuracy']:.2f}%, "
            f"evaluation loss lowest at epoch {c['eval_loss_min_epoch']}; "
            f"overfits: {'yes' if c['overfits'] else 'no'}; "
            f"training time {c['train_wall_time_s']:.0f} s.",
            "",
            "| epoch | train loss | eval accuracy % | eval loss |",
            "|---|---|---|---|",
        ]
        for e in c["epochs"]:
            train = "–" if e["train_loss"] is None else f"{e['train_loss']:.3f}"
            out.append(f"| {e['epoch']} | {train} | {100 * e['eval_accuracy']:.2f} | {e['eval_loss']:.4f} |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (…/seed-<k>)")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args()
    curves = [curve(r) for r in args.runs]
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    machine = f"{platform.processor() or platform.machine()}, {platform.system()}"
    command = "python " + " ".join(sys.argv)
    header = (
        "# Proxy study: the baseline's regime\n\n"
        f"- Command: `{command}`\n- Date (UTC): {now}\n- Machine: {machine}\n\n"
        "Each run's learning curve from its own metrics.jsonl (train loss averaged over the epoch's logged steps)."
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"command": command, "date": now, "machine": machine, "runs": curves}, indent=2) + "\n"
    )
    args.out.with_suffix(".md").write_text(render(curves, header) + "\n")
    print(render(curves, header))


if __name__ == "__main__":
    main()
