"""What a masked-LM warm start buys the tiny model: fine-tuned from random init vs from `clue-adv pretrain` runs.

1. Pretrain the tiny model (configs/pretrain/tnews-tiny.yaml: 2 layers, hidden 128, bert-base-chinese vocabulary,
   random init) on TNEWS's training text for each budget (minutes of wall time, or optimizer steps with --steps;
   one run per budget, each its own warmup and decay). A step budget does not depend on what else the machine
   runs: use it when the measurement shares the machine (4,000 steps took 29.9 minutes on the 2-core development
   machine alone, so 1,300 and 4,000 steps are its "10 and 30 minutes").
2. Fine-tune with the same settings (configs/smoke.yaml's tiny model, optimizer and lengths, on the full data,
   `--epochs` epochs) from random init and from each pretrain's output, for every seed. A seed fixes the
   classifier head's init and the batch order, so runs pair up by seed across starting points.
3. Write results/pretrain-warmstart/: the held-out MLM loss curve of each pretrain, every fine-tuning run's dev
   accuracy, mean ± std per starting point and the paired difference to random init (t-test, 95% CI).

Every run is an ordinary run directory under <output>/runs/, so the script resumes where it stopped (completed runs
are not rerun). It takes CPU-hours on the full data:

    python scripts/pretrain_warmstart.py --data /path/to/clue/tnews                 # budgets 10, 30 min; seeds 1-3
    python scripts/pretrain_warmstart.py --data /path/to/clue/tnews --steps 1300,4000  # step budgets instead
    python scripts/pretrain_warmstart.py --smoke                                     # a minute: shows it works
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_common as common  # noqa: E402
import torch  # noqa: E402

from clue_adv.config import load_config  # noqa: E402
from clue_adv.pretrain.config import load_pretrain_config  # noqa: E402
from clue_adv.pretrain.run import pretrain  # noqa: E402
from clue_adv.rundir import read_jsonl  # noqa: E402
from clue_adv.stats import paired_by_key, summarize  # noqa: E402
from clue_adv.train import train  # noqa: E402

REPO = common.REPO
PRETRAIN_CONFIG = REPO / "configs" / "pretrain" / "tnews-tiny.yaml"
FINETUNE_CONFIG = REPO / "configs" / "smoke.yaml"
RANDOM = "random init"


def _quiet() -> Any:
    from rich.console import Console

    return Console(file=io.StringIO())


def pretrain_runs(args: argparse.Namespace, runs: Path) -> dict[str, Path]:
    """One pretrain per budget; {start name: its model directory}."""
    models = {}
    for budget in args.budgets:
        name = f"pretrain {budget_label(budget, args.unit)}"
        # the other budget is unset so the stated one alone ends the run
        limits = [f"max_steps={int(budget)}", "max_minutes=null"] if args.unit == "steps" else [f"max_minutes={budget}"]
        overrides = [
            f"data.path={args.data}",
            *limits,
            f"experiment={name.replace(' ', '-')}",
            f"seed={args.pretrain_seed}",
            *args.pretrain_set,
        ]
        cfg = load_pretrain_config(PRETRAIN_CONFIG, overrides)
        print(f"{name}", flush=True)
        outcome = pretrain(cfg, runs / "pretrain", show_progress=False, console=_quiet())
        if outcome.summary.get("status") != "completed":
            raise SystemExit(f"{name} did not complete: {outcome.directory}")
        models[name] = outcome.model_dir
    return models


def budget_label(budget: float, unit: str) -> str:
    return f"{int(budget)} steps" if unit == "steps" else f"{budget:g} min"


def finetune_runs(args: argparse.Namespace, runs: Path, models: dict[str, Path]) -> dict[str, dict[int, dict]]:
    """{start: {seed: summary}} for random init and each warm start, the same fine-tuning settings for all."""
    starts: dict[str, list[str]] = {RANDOM: []}
    for name, model_dir in models.items():
        # the tiny shape comes from the pretrained config.json: no architecture overrides with pretrained weights
        starts[name] = ["model.init=pretrained", f"model.name_or_path={model_dir}", "model.architecture={}"]
    results: dict[str, dict[int, dict]] = {}
    for name, start in starts.items():
        results[name] = {}
        for seed in args.seeds:
            overrides = [
                f"data.path={args.data}",
                f"epochs={args.epochs}",
                f"seed={seed}",
                f"experiment=finetune-{name.replace(' ', '-')}",
                *start,
                *args.finetune_set,
            ]
            cfg = load_config(FINETUNE_CONFIG, overrides)
            print(f"fine-tune from {name}, seed {seed}", flush=True)
            outcome = train(cfg, runs / "finetune", show_progress=False, console=_quiet())
            results[name][seed] = outcome.summary | {"directory": str(outcome.directory)}
    return results


def mlm_curves(models: dict[str, Path]) -> list[dict[str, Any]]:
    rows = []
    for name, model_dir in models.items():
        for record in read_jsonl(model_dir.parent / "metrics.jsonl"):
            if record.get("type") == "eval":
                rows.append(
                    {
                        "pretrain": name,
                        "step": record["step"],
                        "minutes": record["elapsed_s"] / 60,
                        "heldout_mlm_loss": record["loss"],
                        "masked_token_accuracy": record["masked_accuracy"],
                    }
                )
    return rows


def comparison(results: dict[str, dict[int, dict]]) -> list[dict[str, Any]]:
    rows = []
    for metric in ("best_dev_accuracy", "final_dev_accuracy"):
        baseline = {s: r[metric] for s, r in results[RANDOM].items() if r.get("status") == "completed"}
        for name, by_seed in results.items():
            values = {s: r[metric] for s, r in by_seed.items() if r.get("status") == "completed"}
            summary = summarize(list(values.values()))
            row = {"metric": metric, "start": name, "n": summary.n, "mean": summary.mean, "std": summary.std}
            if name != RANDOM:
                test, seeds = paired_by_key(values, baseline)
                row |= {
                    "delta_vs_random": test.mean_difference,
                    "ci_low": test.ci_low,
                    "ci_high": test.ci_high,
                    "p": test.p,
                    "paired_seeds": seeds,
                }
            rows.append(row)
    return rows


def plot_curves(curves: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in dict.fromkeys(r["pretrain"] for r in curves):
        rows = [r for r in curves if r["pretrain"] == name]
        # steps, not minutes: wall time depends on what else the machine ran
        axes[0].plot([r["step"] for r in rows], [r["heldout_mlm_loss"] for r in rows], label=name)
        axes[1].plot([r["step"] for r in rows], [100 * r["masked_token_accuracy"] for r in rows], label=name)
    axes[0].set(xlabel="optimizer step", ylabel="held-out MLM loss")
    axes[1].set(xlabel="optimizer step", ylabel="held-out masked-token accuracy (%)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(payload: dict[str, Any]) -> str:
    s = payload["setup"]
    pct = lambda x: "–" if x is None or x != x else f"{100 * x:.2f}"  # noqa: E731
    lines = [
        "# Warm start: the tiny model fine-tuned from random init vs from a masked-LM pretrain",
        "",
        *common.machine_markdown(payload["machine"]),
        "",
        f"Pretraining: `{s['pretrain_config']}` on `{s['data']}`'s training text for {s['budgets']} {s['unit']} "
        f"(seed {s['pretrain_seed']}; overrides {s['pretrain_set'] or 'none'}). Fine-tuning: `{s['finetune_config']}` "
        f"on `{s['data']}`, {s['epochs']} epoch(s), seeds {s['seeds']} (overrides {s['finetune_set'] or 'none'}), "
        "the same settings from every start. Wall time "
        f"{s['wall_time_s'] / 60:.1f} min.",
        "",
        "## Held-out MLM loss at the end of each pretrain",
        "",
        "| pretrain | steps | minutes | held-out MLM loss | masked-token accuracy |",
        "|---|---|---|---|---|",
    ]
    for name, p in payload["pretrains"].items():
        final = p.get("heldout_final") or {}
        lines.append(
            f"| {name} | {p.get('steps')} | {p.get('elapsed_s', 0) / 60:.1f} | {final.get('loss', float('nan')):.3f} | "
            f"{pct(final.get('masked_accuracy'))} |"
        )
    lines += ["", "Curves: `mlm-curve.csv`, `mlm-curve.png`.", "", "## TNEWS dev accuracy (%)", ""]
    for metric in ("best_dev_accuracy", "final_dev_accuracy"):
        lines += [
            f"### {'best epoch' if metric.startswith('best') else 'final epoch'}",
            "",
            "| start | n | mean ± std | Δ vs random init (95% CI) | p (paired t) |",
            "|---|---|---|---|---|",
        ]
        for r in payload["comparison"]:
            if r["metric"] != metric:
                continue
            delta = (
                f"{100 * r['delta_vs_random']:+.2f} ({100 * r['ci_low']:+.2f}, {100 * r['ci_high']:+.2f})"
                if "delta_vs_random" in r
                else "–"
            )
            p = f"{r['p']:.3g}" if r.get("p") == r.get("p") and "p" in r else "–"
            lines.append(f"| {r['start']} | {r['n']} | {pct(r['mean'])} ± {pct(r['std'])} | {delta} | {p} |")
        lines.append("")
    lines += ["Per run: `finetune.csv`."]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="TNEWS directory (train.json, dev.json, labels.json); --smoke: the bundled sample")
    p.add_argument("--budgets", default="10,30", help="pretraining budgets in minutes, comma-separated")
    p.add_argument(
        "--steps",
        help="pretraining budgets in optimizer steps, comma-separated, instead of --budgets (independent of load)",
    )
    p.add_argument("--seeds", default="1,2,3", help="fine-tuning seeds, comma-separated")
    p.add_argument("--pretrain-seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs, the same for every start")
    p.add_argument("--pretrain-set", action="append", default=[], help="--set for the pretrains (repeatable)")
    p.add_argument("--finetune-set", action="append", default=[], help="--set for every fine-tuning run")
    p.add_argument("--output", type=Path, help="default: results/pretrain-warmstart (--smoke: a temporary folder)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: steady on a shared machine)")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="a minute-long rehearsal: the bundled sample, 0.05-minute pretrain, 256 texts, 1 epoch, seeds 1,2",
    )
    args = p.parse_args(argv)
    if args.smoke:
        args.data = args.data or str(common.ASSETS / "tnews")
        if args.budgets == "10,30":
            args.budgets = "0.05"
        if args.seeds == "1,2,3":
            args.seeds = "1,2"
        args.epochs = 1
        args.pretrain_set = ["data.max_texts=512", "eval.every_n_steps=5", *args.pretrain_set]
        args.finetune_set = ["data.max_train_samples=256", "data.max_eval_samples=256", *args.finetune_set]
        args.output = args.output or Path(tempfile.mkdtemp(prefix="warmstart-smoke-"))
    if not args.data:
        p.error("--data is required (a TNEWS directory), except with --smoke")
    args.unit = "steps" if args.steps else "minutes"
    try:
        args.budgets = [float(b) for b in (args.steps or args.budgets).split(",")]
    except ValueError:
        p.error(f"budgets must be comma-separated numbers, got {args.steps or args.budgets!r}")
    if any(b <= 0 or (args.steps and b != int(b)) for b in args.budgets):
        p.error(f"budgets must be positive{' whole numbers of steps' if args.steps else ''}: {args.budgets}")
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.output = args.output or REPO / "results" / "pretrain-warmstart"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = common.machine_info(torch.device("cpu"), common.command_line(__file__, argv))
    started = time.perf_counter()
    runs = args.output / "runs"
    models = pretrain_runs(args, runs)
    results = finetune_runs(args, runs, models)
    curves = mlm_curves(models)
    common.finish_info(info)
    pretrains = {name: json.loads((d.parent / "summary.json").read_text()) for name, d in models.items()}
    payload = {
        "machine": info,
        "setup": {
            "data": args.data,
            "budgets": args.budgets,
            "unit": args.unit,
            "seeds": args.seeds,
            "pretrain_seed": args.pretrain_seed,
            "epochs": args.epochs,
            "pretrain_config": str(PRETRAIN_CONFIG.relative_to(REPO)),
            "finetune_config": str(FINETUNE_CONFIG.relative_to(REPO)),
            "pretrain_set": args.pretrain_set,
            "finetune_set": args.finetune_set,
            "wall_time_s": round(time.perf_counter() - started, 1),
        },
        "pretrains": {
            name: {k: p.get(k) for k in ("steps", "elapsed_s", "heldout_final")} for name, p in pretrains.items()
        },
        "comparison": comparison(results),
        "runs": {
            name: {
                str(seed): {k: s.get(k) for k in ("status", "best_dev_accuracy", "final_dev_accuracy", "directory")}
                for seed, s in by_seed.items()
            }
            for name, by_seed in results.items()
        },  # fmt: skip
    }
    args.output.mkdir(parents=True, exist_ok=True)
    with open(args.output / "mlm-curve.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(curves[0]))
        writer.writeheader()
        writer.writerows(curves)
    with open(args.output / "finetune.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["start", "seed", "status", "best_dev_accuracy", "final_dev_accuracy"])
        for name, by_seed in results.items():
            for seed, s in by_seed.items():
                writer.writerow([name, seed, s.get("status"), s.get("best_dev_accuracy"), s.get("final_dev_accuracy")])
    plot_curves(curves, args.output / "mlm-curve.png")
    common.write_outputs("warmstart", payload, markdown(payload), args.output)
    print(markdown(payload))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
