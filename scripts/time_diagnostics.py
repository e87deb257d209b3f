"""What the diagnostics cost on the smoke config, and what they measure there: results/bench/diagnostics-cost.{json,md}.

Trains `configs/smoke.yaml` once (saving the best model), then on that model times `clue_adv.diagnostics.diagnose`
with the default `diagnostics` block and with each part alone (loss/gradient norm only, + curvature, + attacks),
and records the values that justify the defaults: the curvature's probe noise against its spread over examples
(probes), the accuracy under attack over a wider ε grid (epsilons), and PGD with more steps (pgd_steps). Each
timing is the median of `--repeats` calls; the load average is recorded beside them (the machine is shared).

    python scripts/time_diagnostics.py [--repeats 3] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
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
from clue_adv.diagnostics import DiagnosticsConfig, attack_metric, diagnose, diagnostic_batches, metric


def _smoke_config(*overrides: str) -> RunConfig:
    """configs/smoke.yaml, its relative paths (the bundled data and tokenizer) made absolute."""
    paths = [f"data.path={ASSETS / 'tnews'}", f"model.name_or_path={TOKENIZER_DIR}"]
    return load_config(REPO / "configs" / "smoke.yaml", [*paths, *overrides])


def _train_smoke(output_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Train configs/smoke.yaml with save_model: the saved best model and the run's summary."""
    from clue_adv.train import train

    outcome = train(_smoke_config("save_model=true", f"output_dir={output_dir}"), show_progress=False)
    return outcome.directory / "model", outcome.summary


def _timed(model: torch.nn.Module, dev: list, train: list, config: DiagnosticsConfig, seed: int, repeats: int):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = diagnose(model, dev, train, config, seed=seed)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result.metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="calls per timing (the median is kept)")
    parser.add_argument("--model-dir", type=Path, help="a saved smoke model to reuse instead of training one")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as the other benchmarks: one thread is steadier on a shared 2-core machine
    info = machine_info(torch.device("cpu"), command_line(__file__, argv))

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from clue_adv.data import load_task_data

    with tempfile.TemporaryDirectory(prefix="clue-adv-diag-") as tmp:
        summary: dict[str, Any] = {}
        model_dir = args.model_dir
        if model_dir is None:
            model_dir, summary = _train_smoke(Path(tmp))
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, attn_implementation="sdpa")
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        cfg = _smoke_config()
        data = load_task_data(cfg, tokenizer)

    default = DiagnosticsConfig()
    seed = default.resolved_seed(cfg.seed)
    dev, train = diagnostic_batches(data.dev, data.train, tokenizer, default, seed)
    variants = {
        "default": default,
        "loss and gradient norm only (probes 0, no attacks)": default.model_copy(update={"probes": 0, "epsilons": []}),
        f"+ curvature (probes {default.probes}), no attacks": default.model_copy(update={"epsilons": []}),
        "+ attacks, no curvature (probes 0)": default.model_copy(update={"probes": 0}),
    }
    timings, values = {}, {}
    for name, variant in variants.items():
        seconds, metrics = _timed(model, dev, train, variant, seed, args.repeats)
        timings[name] = round(seconds, 2)
        values[name] = metrics
    # Calibration of the defaults (timed once each): a wider ε grid, more PGD steps, more probes.
    wide = default.model_copy(update={"epsilons": [0.003, 0.01, 0.03, 0.1, 0.3], "pgd_steps": 10, "probes": 16})
    _, calibration = _timed(model, dev, None, wide, seed, 1)
    finish_info(info)

    d = values["default"]
    train_s = summary.get("train_wall_time_s")
    payload = {
        "machine": info,
        "model": str(model_dir) if args.model_dir else "configs/smoke.yaml trained here (best dev model)",
        "smoke_run": {k: summary.get(k) for k in ("train_wall_time_s", "best_dev_accuracy", "steps")},
        "diagnostics_config": default.model_dump(),
        "examples": {"dev": int(d[metric("dev", "examples")]), "train": int(d[metric("train", "examples")])},
        "wall_seconds_median": timings,
        "default_metrics": d,
        "calibration_metrics (ε grid ×5, pgd_steps 10, probes 16; dev only)": calibration,
    }
    md = ["# What the diagnostics cost on the smoke config", "", *machine_markdown(info), ""]
    if train_s:
        md.append(
            f"- The smoke run itself: {train_s:.1f} s of training ({summary.get('steps')} steps, best dev accuracy "
            f"{100 * summary['best_dev_accuracy']:.2f}%); the diagnostics below run on its best model."
        )
    md += [
        f"- Subsets: {payload['examples']['dev']} dev and {payload['examples']['train']} train examples, "
        f"batch {default.batch_size}, probes {default.probes}, ε {default.epsilons}, PGD {default.pgd_steps} steps.",
        f"- One call with the defaults: **{timings['default']} s** (median of {args.repeats}); at the end of a run "
        "it measures the best and the final model: twice that, unless they are the same.",
    ]
    if train_s:
        share = timings["default"] / train_s
        md.append(f"- That is {100 * share:.1f}% of the smoke run's training time here ({200 * share:.1f}% for both).")
    md += [
        "",
        "| diagnostics | wall s (median) |",
        "|---|---|",
        *(f"| {name} | {seconds} |" for name, seconds in timings.items()),
        "",
        "## Values on the smoke model (defaults)",
        "",
        "| quantity | dev | train |",
        "|---|---|---|",
    ]
    for q in (
        "loss",
        "accuracy",
        "input_grad_norm_mean",
        "input_grad_norm_median",
        "embedding_norm_mean",
        "input_curvature_mean",
        "input_curvature_se",
        "input_curvature_probe_se",
    ):
        md.append(f"| {q} | {d[metric('dev', q)]:.4g} | {d[metric('train', q)]:.4g} |")
    spread = {s: d[metric(s, "input_curvature_se")] * d[metric(s, "examples")] ** 0.5 for s in ("dev", "train")}
    md.append(f"| input_curvature std between examples (se·√n) | {spread['dev']:.4g} | {spread['train']:.4g} |")
    md += ["", "## Calibration: wider ε grid, PGD 10 steps, 16 probes (dev)", ""]
    md += ["| ε (relative) | FGM acc | PGD-10 acc |", "|---|---|---|"]
    for eps in wide.epsilons:
        fgm = calibration[attack_metric("fgm", "accuracy", eps)]
        pgd = calibration[attack_metric("pgd", "accuracy", eps)]
        md.append(f"| {eps:g} | {100 * fgm:.1f}% | {100 * pgd:.1f}% |")
    md += ["", "Default grid, PGD 3 steps:", "", "| ε (relative) | FGM acc | PGD-3 acc |", "|---|---|---|"]
    for eps in default.epsilons:
        fgm, pgd = d[attack_metric("fgm", "accuracy", eps)], d[attack_metric("pgd", "accuracy", eps)]
        md.append(f"| {eps:g} | {100 * fgm:.1f}% | {100 * pgd:.1f}% |")
    c = calibration
    md += [
        "",
        f"Curvature with 16 probes: mean {c[metric('dev', 'input_curvature_mean')]:.4g}, standard error over "
        f"examples {c[metric('dev', 'input_curvature_se')]:.4g}, of which the probes' "
        f"{c[metric('dev', 'input_curvature_probe_se')]:.4g}.",
    ]
    write_outputs("diagnostics-cost", payload, "\n".join(md) + "\n")
    print("\n".join(md))
    print(json.dumps(timings))


if __name__ == "__main__":
    main()
