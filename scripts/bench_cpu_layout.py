"""How to spend a CPU on the proxy study: `--jobs` (runs side by side) and `model.compile`, measured.

Two questions the proxy study's sweeps (sweeps/proxy-tnews*.yaml) depend on, answered on this machine with the
study's own run config (configs/proxy/tnews.yaml) cut to a short workload (`--train-samples` training examples,
one epoch, `--eval-samples` dev examples, no diagnostics, no checkpoints):

1. **--jobs.** The same two runs (seeds 1 and 2) through `clue-adv sweep`, once with `--jobs 1` (one run at a time,
   all cores) and once with `--jobs N` (N runs side by side, the cores split between them, as the sweep does it).
   Compared: the sweep's wall time. Whatever is faster per run is what the study's sweeps should use.
2. **model.compile.** For each strategy given that allows it (no double backward), one run eager and one with
   `model.compile: true` (`--backend`, default inductor), one at a time; compared: the median per-step time over
   the logged windows after the first `--skip-windows` (compilation happens in the first steps; recompiles for
   new padded lengths can happen later and are counted), and the run's wall time, compile time included.

Timings on a shared machine are noisy: compare within one run of this script (ratios), never across runs.

    python scripts/bench_cpu_layout.py --data /path/to/clue/tnews
    python scripts/bench_cpu_layout.py --data /path/to/clue/tnews --skip-jobs --strategies none
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from _bench_common import REPO, RESULTS, command_line, finish_info, machine_info, machine_markdown, write_outputs

CONFIG = REPO / "configs" / "proxy" / "tnews.yaml"
STRATEGIES = {
    "none": {"name": "none"},
    # the study's FGM as the proxy sweeps run it (one global norm over the used embedding rows, adversarial-only)
    "fgm": {
        "name": "fgm",
        "target": "embedding_matrix",
        "norm": "l2",
        "combine": "adversarial_only",
        "epsilon_unit": "relative",
        "epsilon": 0.03,
    },
}


def _workload(args: argparse.Namespace) -> list[str]:
    """`--set` arguments that cut the proxy run to a short, comparable workload."""
    return [
        f"data.path={args.data}",
        "epochs=1",
        f"data.max_train_samples={args.train_samples}",
        "data.holdout_size=0",
        "data.eval_split=dev",
        f"data.max_eval_samples={args.eval_samples}",
        "diagnostics.enabled=false",
        "checkpoint.every_epoch=false",
        "log_every_n_steps=10",
    ]


def _sweep_file(directory: Path, strategies: list[dict[str, Any]], seeds: list[int], extra: dict[str, Any]) -> Path:
    sweep = {
        "base": str(CONFIG),
        "experiment": "bench-layout",
        "tasks": ["tnews"],
        "seeds": seeds,
        "strategies": strategies,
    }
    if extra:
        sweep["overrides"] = extra
    path = directory / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep, sort_keys=False), encoding="utf-8")
    return path


def _sweep(args: argparse.Namespace, sweep: Path, out: Path, jobs: int, sets: list[str]) -> float:
    """Run `clue-adv sweep` from the repository root (the proxy config's warm start is a repository path)."""
    command = [sys.executable, "-m", "clue_adv", "sweep", "-c", str(sweep), "-o", str(out), "--jobs", str(jobs)]
    for s in sets:
        command += ["--set", s]
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # the sweep gives each worker its share of the cores itself
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"clue-adv sweep failed (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall


def _step_times(run_dir: Path, skip_windows: int) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    times = [r["step_time_s"] for r in records if r.get("type") == "train" and "step_time_s" in r]
    return times[skip_windows:]


def _run_dirs(out: Path) -> list[Path]:
    return sorted(p.parent for p in out.rglob("summary.json"))


def measure_jobs(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rows = []
    for jobs in (1, args.jobs):
        directory = work / f"jobs-{jobs}"
        directory.mkdir()
        sweep = _sweep_file(directory, [{"name": "none"}], [1, 2], {})
        wall = _sweep(args, sweep, directory / "out", jobs, _workload(args))
        summaries = [json.loads((d / "summary.json").read_text()) for d in _run_dirs(directory / "out")]
        rows.append(
            {
                "jobs": jobs,
                "runs": len(summaries),
                "wall_s": wall,
                "wall_per_run_s": wall / len(summaries),
                "mean_step_time_s": statistics.mean(s["mean_step_time_s"] for s in summaries),
            }
        )
        print(f"--jobs {jobs}: {len(summaries)} runs in {wall:.1f} s", flush=True)
    return {"rows": rows, "speedup": rows[0]["wall_s"] / rows[1]["wall_s"]}


def measure_compile(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    rows = []
    for name in args.strategies:
        for compiled in (False, True):
            directory = work / f"compile-{name}-{compiled}"
            directory.mkdir()
            sweep = _sweep_file(directory, [STRATEGIES[name]], [1], {})
            sets = [*_workload(args), f"model.compile={str(compiled).lower()}", f"model.compile_backend={args.backend}"]
            wall = _sweep(args, sweep, directory / "out", 1, sets)
            (run_dir,) = _run_dirs(directory / "out")
            steps = _step_times(run_dir, args.skip_windows)
            rows.append(
                {
                    "strategy": name,
                    "compile": compiled,
                    "wall_s": wall,
                    "median_step_s": statistics.median(steps),
                    "windows": len(steps),
                }
            )
            print(f"{name} compile={compiled}: wall {wall:.1f} s, median step {statistics.median(steps) * 1e3:.1f} ms")
    ratios = {}
    for name in args.strategies:
        eager, comp = (r for r in rows if r["strategy"] == name)
        ratios[name] = {
            "step": comp["median_step_s"] / eager["median_step_s"],
            "wall": comp["wall_s"] / eager["wall_s"],
        }
    return {"rows": rows, "compiled_over_eager": ratios}


def render(payload: dict[str, Any]) -> str:
    lines = ["# CPU layout for the proxy study: --jobs and model.compile", ""]
    lines += machine_markdown(payload["machine"])
    a = payload["args"]
    lines += [
        "",
        f"Workload per run: configs/proxy/tnews.yaml, 1 epoch on the first {a['train_samples']} TNEWS training "
        f"examples, {a['eval_samples']} dev examples, no diagnostics or checkpoints. Ratios within this one run.",
    ]
    if "jobs" in payload:
        j = payload["jobs"]
        lines += [
            "",
            "## --jobs",
            "",
            "| --jobs | runs | wall s | wall per run s | mean step ms |",
            "|---|---|---|---|---|",
        ]
        for r in j["rows"]:
            lines.append(
                f"| {r['jobs']} | {r['runs']} | {r['wall_s']:.1f} | {r['wall_per_run_s']:.1f} | "
                f"{r['mean_step_time_s'] * 1e3:.1f} |"
            )
        lines += [
            "",
            f"`--jobs {j['rows'][1]['jobs']}` finishes the same runs {j['speedup']:.2f}× as fast as `--jobs 1`.",
        ]
    if "compile" in payload:
        c = payload["compile"]
        lines += [
            "",
            f"## model.compile (backend {a['backend']}, one run at a time)",
            "",
            "| strategy | compile | wall s (compile included) | median step ms | windows |",
            "|---|---|---|---|---|",
        ]
        for r in c["rows"]:
            lines.append(
                f"| {r['strategy']} | {r['compile']} | {r['wall_s']:.1f} | {r['median_step_s'] * 1e3:.1f} | "
                f"{r['windows']} |"
            )
        lines.append("")
        for name, ratio in c["compiled_over_eager"].items():
            lines.append(f"- {name}: compiled/eager step time {ratio['step']:.2f}, wall time {ratio['wall']:.2f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="local CLUE TNEWS directory (train.json, dev.json)")
    p.add_argument("--train-samples", type=int, default=3200)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=2, help="the side-by-side layout compared with --jobs 1")
    p.add_argument("--strategies", type=lambda s: s.split(","), default=["none", "fgm"], help="for model.compile")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--skip-windows", type=int, default=2, help="logged windows left out of the step median")
    p.add_argument("--skip-jobs", action="store_true")
    p.add_argument("--skip-compile", action="store_true")
    p.add_argument("--output-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    unknown = [s for s in args.strategies if s not in STRATEGIES]
    if unknown:
        p.error(f"--strategies: unknown {unknown}; known: {sorted(STRATEGIES)}")
    args.data = args.data.resolve()

    info = machine_info(torch.device("cpu"), command_line("scripts/bench_cpu_layout.py", argv))
    payload: dict[str, Any] = {
        "machine": info,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    with tempfile.TemporaryDirectory(prefix="bench-layout-") as tmp:
        work = Path(tmp)
        if not args.skip_jobs:
            payload["jobs"] = measure_jobs(args, work)
        if not args.skip_compile:
            payload["compile"] = measure_compile(args, work)
    finish_info(info)
    json_path, md_path = write_outputs("cpu-layout", payload, render(payload), args.output_dir)
    print(f"wrote {md_path} and {json_path}")


if __name__ == "__main__":
    main()
