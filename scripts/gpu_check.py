"""One-shot GPU check: the CUDA tests, both benchmarks at BERT-base shape, host syncs per optimizer step and
bf16-vs-fp32 agreement per strategy, all written to one folder, in under ten minutes on one GPU, with no network.

    python scripts/gpu_check.py                                  # on a machine with a GPU
    python scripts/gpu_check.py --dry-run                        # anywhere: every step on the CPU, tiny sizes
    python scripts/gpu_check.py --only syncs,bf16                # some of the steps
    python scripts/gpu_check.py --output-dir /tmp/gc --archive gc.tar.gz   # the folder as one file as well

Steps, in order, each in its own process under its own time limit (and all of them under --budget), so that a
crash, a hang or a timeout is recorded and the next step still runs:

  env         GPU, driver (nvidia-smi), torch/CUDA/library versions, which of clue_adv's dependencies import
  pytest      every test marked `gpu` (python -m pytest -m gpu on the files that use the marker)
  syncs       host syncs per optimizer step of clue_adv.train.train_step, per strategy: every operation that
              waits for the GPU, as torch.cuda.set_sync_debug_mode("warn") reports it, with the lines issuing them
  bf16        per strategy, the regularizer's share of the parameter gradient (the step minus the same step with
              the regularizer switched off) under bf16 autocast against fp32: their cosine (>= 0.9 agrees)
  strategies  scripts/bench_strategies.py (step time of every strategy relative to plain fine-tuning)
  throughput-tnews, throughput-iflytek
              scripts/bench_throughput.py, one task each (clue_adv vs transformers.Trainer vs pad-to-128)

The model is BERT-base's shape (12 layers, hidden 768, 12 heads, 3072; the bundled bert-base-chinese config.json
and tokenizer) with random weights: nothing is downloaded. The folder holds summary.md and summary.json (every
step's status, time and results; rewritten after each step, so a check cut short keeps what it finished), one
<step>.log per step, and each step's own files. Exit status: 0 when every step ran through, 1 when one failed
(a failing CUDA test fails the pytest step; a bf16 disagreement or a missed target is a finding, listed first in the
summary) or ran out of time, 2 when there is no GPU to check (use --dry-run there). README, "Checking on a GPU",
says how to bring the dependencies a CUDA image lacks (scripts/gpu_check_wheels.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# No torch at the top: the steps that need it run in child processes, so a CUDA crash or hang cannot take the
# check down with it. The probes (--internal) import it when they start.
SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
RESULTS = REPO / "results" / "bench"


@dataclass(frozen=True)
class Step:
    name: str
    budget_s: int  # the most this step may take; the whole check's --budget may cut it shorter
    what: str


STEPS = (
    Step("env", 60, "GPU, driver and library versions; which dependencies import"),
    Step("pytest", 150, "the tests marked gpu"),
    Step("syncs", 90, "host syncs per optimizer step, per strategy"),
    Step("bf16", 90, "bf16-vs-fp32 agreement of the regularizer's gradient, per strategy"),
    Step("strategies", 150, "scripts/bench_strategies.py"),
    Step("throughput-tnews", 150, "scripts/bench_throughput.py --tasks tnews"),
    Step("throughput-iflytek", 120, "scripts/bench_throughput.py --tasks iflytek"),
)
STEP_NAMES = tuple(s.name for s in STEPS)
DEFAULT_BUDGET_S = 540  # nine minutes: under ten with the start-up and the archive
MIN_STEP_S = 15  # a step given less than this is recorded as skipped rather than started to be killed

# What the GPU check measures at, and its --dry-run stand-ins (the CPU-sized shape of the benchmarks).
SIZES: dict[bool, dict[str, Any]] = {
    False: {
        "device": "cuda",
        "shape": "base",  # the benchmarks' name for the bundled bert-base-chinese config.json
        "probe_model": "BERT-base (12 × 768)",
        "probe_architecture": {},
        "probe_warmup": 2,
        "probe_steps": 3,
        "strategies_args": ["--steps", "20", "--warmup", "3"],
        "throughput_args": ["--rounds", "3", "--train-examples", "4000", "--eval-examples", "1000"],
    },
    True: {
        "device": "cpu",
        "shape": "tiny",
        "probe_model": "a 1 × 32 BERT",
        "probe_architecture": {
            "num_hidden_layers": 1,
            "hidden_size": 32,
            "num_attention_heads": 2,
            "intermediate_size": 64,
        },
        "probe_warmup": 1,
        "probe_steps": 1,
        "strategies_args": ["--steps", "1", "--warmup", "0"],
        "throughput_args": [
            *("--rounds", "1", "--train-examples", "32", "--eval-examples", "32"),
            *("--contenders", "clue_adv,pad128"),  # no Trainer: importing it is most of a dry step's time
        ],
    },
}

# What clue_adv, its tests and the benchmarks import (module name: distribution), checked by the env step.
REQUIRED_MODULES = {
    "torch": "torch",
    "transformers": "transformers",
    "datasets": "datasets",
    "pydantic": "pydantic",
    "typer": "typer",
    "yaml": "pyyaml",
    "rich": "rich",
    "scipy": "scipy",
    "matplotlib": "matplotlib",
    "accelerate": "accelerate",
    "pytest": "pytest",
    "clue_adv": "clue-adv",
}


# ------------------------------------------------------------------------------------------------------
# The orchestrator: one child process per step


GPU_MARKER = re.compile(r"pytest\.mark\.gpu\b")


def gpu_test_files() -> list[str]:
    """Test files that use the `gpu` marker: their gpu tests run, and no other file is imported (a module that needs
    a package the GPU machine lacks would stop the collection)."""
    return sorted(
        str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if GPU_MARKER.search(p.read_text("utf-8"))
    )


def step_command(step: str, out: Path, dry_run: bool, strategies: str | None = None) -> list[str]:
    """The child process of one step. `strategies` (comma-separated names or row labels) narrows the probes and
    the strategy benchmark."""
    sizes = SIZES[dry_run]
    py = sys.executable
    only = ["--strategies", strategies] if strategies else []
    internal = [py, str(Path(__file__).resolve()), "--internal", step, "--output-dir", str(out)]
    if step in ("env", "syncs", "bf16"):
        return internal + (["--dry-run"] if dry_run else []) + (only if step != "env" else [])
    if step == "pytest":
        timeout = ["--timeout", "120"] if importlib.util.find_spec("pytest_timeout") else []
        return [
            *(py, "-m", "pytest", "-m", "gpu", "-q", "-rA", "-p", "no:cacheprovider"),
            f"--junitxml={out / 'pytest.xml'}",
            *timeout,
            *gpu_test_files(),
        ]
    common = ["--device", sizes["device"], "--shape", sizes["shape"]]
    if step == "strategies":
        # No per-strategy memory processes: one fresh process per strategy would take most of the step's budget.
        return [py, str(SCRIPTS / "bench_strategies.py"), *common, "--no-memory", *sizes["strategies_args"], *only] + [
            "--output-dir",
            str(out / step),
        ]
    if step.startswith("throughput-"):
        task = step.removeprefix("throughput-")
        return [py, str(SCRIPTS / "bench_throughput.py"), *common, "--tasks", task, *sizes["throughput_args"]] + [
            "--output-dir",
            str(out / step),
        ]
    raise ValueError(step)


def child_environment() -> dict[str, str]:
    env = dict(os.environ)
    # The check runs offline by design: no hub look-ups (on a machine without a network they wait for a timeout).
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The repository's clue_adv, installed or not.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_step(step: Step, out: Path, dry_run: bool, limit_s: float, strategies: str | None = None) -> dict[str, Any]:
    """Run one step in its own process group, killed with its children at `limit_s`; what it printed goes to
    <step>.log."""
    command = step_command(step.name, out, dry_run, strategies)
    log = out / f"{step.name}.log"
    started = time.monotonic()
    with log.open("w", encoding="utf-8") as sink:
        sink.write(f"$ {' '.join(command)}\n\n")
        sink.flush()
        proc = subprocess.Popen(
            command, cwd=REPO, env=child_environment(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc: int | None = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group it leads: pytest's or a benchmark's children too
            proc.wait()
            rc = None
    seconds = time.monotonic() - started
    status = "timed out" if rc is None else ("ok" if rc == 0 else "failed")
    record: dict[str, Any] = {
        "step": step.name,
        "what": step.what,
        "status": status,
        "returncode": rc,
        "seconds": round(seconds, 1),
        "limit_s": round(limit_s, 1),
        "command": " ".join(command),
        "log": log.name,
    }
    try:
        record["results"] = COLLECTORS[step.name](out)
    except Exception as e:  # a step that wrote nothing (or garbage) is already failed or timed out; say what is missing
        record["results"] = None
        record["results_error"] = f"{type(e).__name__}: {e}"
    if status != "ok":
        record["log_tail"] = log.read_text("utf-8", errors="replace").splitlines()[-30:]
    if status == "ok" and record["results"] is None:
        record["status"] = "failed"  # it exited 0 but left no results
    return record


# ------------------------------------------------------------------------------------------------------
# Reading each step's files back


def _only_json(folder: Path) -> dict[str, Any]:
    found = sorted(folder.glob("*.json"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one .json in {folder.name}/, found {[p.name for p in found]}")
    return json.loads(found[0].read_text("utf-8"))


def collect_env(out: Path) -> dict[str, Any]:
    return json.loads((out / "env.json").read_text("utf-8"))


def collect_pytest(out: Path) -> dict[str, Any]:
    root = ET.parse(out / "pytest.xml").getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    problems = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            element = case.find(kind)
            if element is not None:
                message = (element.get("message") or "").strip().splitlines()
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                problems.append({"test": name, "kind": kind, "message": message[0][:300] if message else ""})
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {"counts": counts, "problems": problems, "files": gpu_test_files()}


def collect_syncs(out: Path) -> dict[str, Any]:
    return json.loads((out / "syncs.json").read_text("utf-8"))


def collect_bf16(out: Path) -> dict[str, Any]:
    return json.loads((out / "bf16.json").read_text("utf-8"))


def collect_strategies(out: Path) -> dict[str, Any]:
    payload = _only_json(out / "strategies")
    rows = {
        label: {
            k: r[k]
            for k in ("ratio_to_none", "target", "meets_target", "training_step_ratio_to_none", "step_ms_median")
        }
        for label, r in payload["strategies"].items()
    }
    return {"setup": payload["setup"], "gpu": payload["machine"].get("gpu"), "strategies": rows}


def collect_throughput(out: Path, task: str) -> dict[str, Any]:
    payload = _only_json(out / f"throughput-{task}")
    s = payload["tasks"][task]
    return {
        "setup": payload["setup"],
        "train_samples_per_s": {name: r["samples_per_s_median"] for name, r in s["train"].items()},
        "eval_samples_per_s": {name: r["samples_per_s_median"] for name, r in s["eval"].items()},
        "targets": {k: {"ratio": t["ratio"], "target": t["target"]} for k, t in s["targets"].items()},
    }


COLLECTORS = {
    "env": collect_env,
    "pytest": collect_pytest,
    "syncs": collect_syncs,
    "bf16": collect_bf16,
    "strategies": collect_strategies,
    "throughput-tnews": lambda out: collect_throughput(out, "tnews"),
    "throughput-iflytek": lambda out: collect_throughput(out, "iflytek"),
}


# ------------------------------------------------------------------------------------------------------
# The summary


def _f(x: Any, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _g(x: Any) -> str:
    return "–" if x is None else f"{x:.2g}"  # spans 1e-7 to 1


def summary_markdown(summary: dict[str, Any]) -> str:
    steps = summary["steps"]
    env = (steps.get("env") or {}).get("results") or {}
    cuda = env.get("cuda") or {}
    lines = [
        f"# GPU check{' (CPU dry run: tiny sizes, not a measurement)' if summary['dry_run'] else ''}",
        "",
        f"- Date (UTC): {summary['started']}; wall time {summary.get('wall_time_s', '?')} s "
        f"of a {summary['budget_s']} s budget",
        f"- Command: `{summary['command']}`",
        f"- GPU: {cuda.get('device_name') or 'none'}; driver {env.get('driver') or '–'}; "
        f"torch {env.get('versions', {}).get('torch', '?')} (CUDA {cuda.get('torch_cuda') or '–'})",
        f"- clue_adv commit: {env.get('git_commit') or '?'}" + (" (uncommitted changes)" * bool(env.get("git_dirty"))),
    ]
    lines += [f"- Note: {note}" for note in summary.get("notes", [])]
    if env.get("missing"):
        lines.append(
            f"- **Missing or broken imports: {', '.join(env['missing'])}** (README, 'Checking on a GPU': carry wheels)"
        )
    lines += ["", "| step | status | seconds (limit) | what |", "|---|---|---|---|"]
    for name in STEP_NAMES:
        s = steps.get(name)
        if s is None:
            continue
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0)} ({s.get('limit_s', '–')}) | {s['what']} |")
    findings = _findings(steps)
    if findings:
        lines += ["", "## Findings", ""]
        if summary["dry_run"]:
            lines += ["(A dry run: at these sizes on a CPU, none of these means anything.)", ""]
        lines += findings
    lines += _pytest_section(steps.get("pytest"))
    lines += _syncs_section(steps.get("syncs"))
    lines += _bf16_section(steps.get("bf16"))
    lines += _strategies_section(steps.get("strategies"))
    lines += _throughput_section([steps.get(f"throughput-{t}") for t in ("tnews", "iflytek")])
    failed = [s for s in steps.values() if s["status"] != "ok"]
    if failed:
        lines += ["", "## What went wrong"]
        for s in failed:
            lines += ["", f"### {s['step']}: {s['status']}", ""]
            if s.get("results_error"):
                lines.append(f"Results: {s['results_error']}")
            if s.get("log_tail"):
                lines += ["```", *s["log_tail"], "```"]
    return "\n".join(lines) + "\n"


def _results(step: dict[str, Any] | None) -> Any:
    return None if step is None else step.get("results")


def _findings(steps: dict[str, Any]) -> list[str]:
    """What a reader should look at first: failed tests, missed targets, bf16 disagreements, syncs above none."""
    lines = []
    if r := _results(steps.get("pytest")):
        lines += [f"- CUDA test {p['kind']}: `{p['test']}`" for p in r["problems"]]
    if r := _results(steps.get("bf16")):
        for label, row in r["cases"].items():
            if "error" in row:
                lines.append(f"- bf16 probe error in {label}: {row['error']}")
            elif not row["agrees"]:
                lines.append(f"- bf16 disagrees with fp32 in {label}: cosine {_f(row['cosine'], 3)} < {r['threshold']}")
    if (r := _results(steps.get("syncs"))) and r["measurable"]:
        for label, row in r["strategies"].items():
            if "error" in row:
                lines.append(f"- sync probe error in {label}: {row['error']}")
            elif (row.get("over_none") or 0) > 0:
                lines.append(f"- {label} syncs {row['over_none']:g} more times per step than none")
    if r := _results(steps.get("strategies")):
        for label, row in r["strategies"].items():
            if row["meets_target"] is False:
                lines.append(f"- {label} step costs {row['ratio_to_none']:.2f} × none's (target ≤ {row['target']})")
    for task in ("tnews", "iflytek"):
        if r := _results(steps.get(f"throughput-{task}")):
            for key, t in r["targets"].items():
                if t["ratio"] < t["target"]:
                    lines.append(f"- {task}: {key} {t['ratio']:.2f} (target ≥ {t['target']})")
    return lines


def _pytest_section(step: dict[str, Any] | None) -> list[str]:
    r = _results(step)
    if not r:
        return []
    c = r["counts"]
    lines = [
        "",
        "## CUDA tests",
        "",
        f"{c['passed']} passed, {c['failures']} failed, {c['errors']} errors, {c['skipped']} skipped "
        f"({', '.join(r['files'])}).",
    ]
    lines += [f"- **{p['kind']}** `{p['test']}`: {p['message']}" for p in r["problems"]]
    return lines


def _syncs_section(step: dict[str, Any] | None) -> list[str]:
    r = _results(step)
    if not r:
        return []
    lines = ["", "## Host syncs per optimizer step", "", r["method"], ""]
    if not r["measurable"]:
        lines += ["Not measurable on the CPU: the dry run only checks that the probe runs.", ""]
    lines += [
        "| strategy | syncs per step | over none | in the batch's transfer | forward passes | where (calls per step) |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in r["strategies"].items():
        if "error" in row:
            lines.append(f"| {label} | error: {row['error']} | | | | |")
            continue
        where = "; ".join(f"`{k}` {v:g}" for k, v in list(row["sources"].items())[:4])
        counts = [row["syncs_per_step"], row.get("over_none"), row["transfer_syncs_per_step"]]
        shown = [_f(x, 1) if r["measurable"] else "–" for x in counts]
        lines.append(f"| {label} | {' | '.join(shown)} | {row['forward_passes']:g} | {where} |")
    return lines


def _bf16_section(step: dict[str, Any] | None) -> list[str]:
    r = _results(step)
    if not r:
        return []
    lines = [
        "",
        "## bf16 vs fp32: the regularizer's share of the parameter gradient",
        "",
        r["method"],
        "",
        "| case | cosine | agrees (≥ 0.9) | ‖bf16 − fp32‖ / ‖fp32‖ | share / whole fp32 gradient | switched off by |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in r["cases"].items():
        if "error" in row:
            lines.append(f"| {label} | error: {row['error']} | | | | |")
            continue
        agrees = "–" if row["cosine"] is None else ("yes" if row["agrees"] else "**no**")
        lines.append(
            f"| {label} | {_f(row['cosine'], 3)} | {agrees} | {_f(row['relative_difference'], 3)} | "
            f"{_g(row['share_of_gradient'])} | {row['off']} |"
        )
    return lines


def _strategies_section(step: dict[str, Any] | None) -> list[str]:
    r = _results(step)
    if not r:
        return []
    setup = r["setup"]
    lines = [
        "",
        f"## Strategy cost ({setup['shape']} BERT, {setup['precision']}, batch {setup['batch_size']}; "
        f"strategies/ has the full table)",
        "",
        "| strategy | ratio to none | target | training_step ratio | step ms (median) |",
        "|---|---|---|---|---|",
    ]
    for label, row in r["strategies"].items():
        target = "–" if row["target"] is None else f"≤ {row['target']}" + (" ✓" if row["meets_target"] else " ✗")
        lines.append(
            f"| {label} | {_f(row['ratio_to_none'])} | {target} | {_f(row['training_step_ratio_to_none'])} | "
            f"{_f(row['step_ms_median'], 1)} |"
        )
    return lines


def _throughput_section(steps: list[dict[str, Any] | None]) -> list[str]:
    done = [(s["step"].removeprefix("throughput-"), s["results"]) for s in steps if _results(s)]
    if not done:
        return []
    lines = ["", "## Fine-tuning throughput (samples/s, medians; throughput-*/ have the full tables)", ""]
    for task, r in done:
        train = ", ".join(f"{k} {v:.0f}" for k, v in r["train_samples_per_s"].items())
        targets = "; ".join(
            f"{k} {t['ratio']:.2f} (≥ {t['target']} {'✓' if t['ratio'] >= t['target'] else '✗'})"
            for k, t in r["targets"].items()
        )
        lines.append(f"- {task.upper()} ({r['setup']['shape']}, {r['setup']['precision']}): {train}. {targets}")
    return lines


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    for name, text in (
        ("summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n"),
        ("summary.md", summary_markdown(summary)),
    ):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(out / name)


# ------------------------------------------------------------------------------------------------------
# The probes (run as `--internal NAME` in a child process)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def probe_env(out: Path, dry_run: bool, strategies: str | None = None) -> int:
    """env.json and nvidia-smi.txt. Exit 3 when there is no GPU (and this is no dry run), 1 when an import fails."""
    from importlib import import_module
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {"python": platform.python_version()}
    missing = []
    for module, dist in REQUIRED_MODULES.items():
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = None
        try:
            import_module(module)
        except Exception as e:  # any import failure (absent, or a version that breaks) is what this step reports
            missing.append(f"{module} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")
    import torch

    info: dict[str, Any] = {
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "cpu_cores": os.cpu_count(),
        "versions": versions,
        "missing": missing,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "clue_adv", "scripts")),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    cuda: dict[str, Any] = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if cuda["available"]:
        props = torch.cuda.get_device_properties(0)
        cuda |= {
            "device_count": torch.cuda.device_count(),
            "device_name": torch.cuda.get_device_name(0),
            "capability": list(torch.cuda.get_device_capability(0)),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "cudnn": torch.backends.cudnn.version(),
        }
    info["cuda"] = cuda
    smi = shutil.which("nvidia-smi")
    info["driver"] = None
    if smi:
        try:
            full = subprocess.run([smi], capture_output=True, text=True, timeout=30)
            (out / "nvidia-smi.txt").write_text(full.stdout + full.stderr, encoding="utf-8")
            query = subprocess.run(
                [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            info["nvidia_smi"] = query.stdout.strip()
            info["driver"] = query.stdout.split(",")[1].strip() if query.stdout.count(",") >= 2 else None
        except (OSError, subprocess.SubprocessError) as e:
            info["nvidia_smi"] = f"failed: {e}"
    else:
        info["nvidia_smi"] = "not found"
    (out / "env.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(info, indent=2))
    if not cuda["available"] and not dry_run:
        return 3
    return 1 if missing else 0


def _probe_setup(dry_run: bool, strategies: str | None) -> dict[str, Any]:
    """What both probes share: the device, the model shape, real TNEWS batches, the strategy rows."""
    sys.path.insert(0, str(SCRIPTS))
    import _bench_common as common
    import bench_strategies
    import torch

    from clue_adv.train import pad_multiple_for

    sizes = SIZES[dry_run]
    device = torch.device(sizes["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device is available (use --dry-run on a machine without one)")
    if device.type == "cpu":
        torch.set_num_threads(1)  # as the benchmarks run on a shared CPU
    batches = common.fixed_batches(
        common.load_tokenizer(),
        task="tnews",
        count=4,
        batch_size=32,
        max_length=128,
        seed=1,
        pad_to_multiple_of=pad_multiple_for(device),
    )
    return {
        "common": common,
        "bench": bench_strategies,
        "device": device,
        "architecture": dict(sizes["probe_architecture"]),
        "batches": batches,
        "rows": bench_strategies.strategy_rows(strategies.split(",") if strategies else None),
        "sizes": sizes,
    }


class SharedModels:
    """One model per attention implementation (eager for double backward, else SDPA), built once at the same seed
    and handed to every strategy that runs on it: building BERT-base per strategy would take most of the budget."""

    def __init__(self, s: dict[str, Any], architecture: dict[str, Any], scale_embeddings_to: float | None = None):
        self.s, self.architecture, self.scale = s, architecture, scale_embeddings_to
        self.models: dict[bool, Any] = {}

    def get(self, row: Any) -> Any:
        import torch
        from transformers import set_seed

        from clue_adv.data import bundled_labels
        from clue_adv.model import build_model
        from clue_adv.regularizers import build_strategy

        double = build_strategy(row.config).needs_double_backward
        if double not in self.models:
            cfg = self.s["common"].run_config(
                task="tnews", architecture=self.architecture, device=self.s["device"], strategy=row.config.model_dump()
            )
            set_seed(1)
            model = build_model(cfg, bundled_labels("tnews"), double).to(self.s["device"])
            if self.scale is not None:
                with torch.no_grad():
                    weight = model.get_input_embeddings().weight
                    weight.mul_(self.scale / weight.norm(dim=1).mean())
            self.models[double] = model
        return self.models[double]


@contextlib.contextmanager
def caught_syncs(cuda: bool):
    """The synchronizing CUDA operations issued inside the block, as warnings with their Python lines (an empty
    list on the CPU, which has nothing to wait for)."""
    import warnings

    import torch

    found: list[warnings.WarningMessage] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every occurrence, not the first per line
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield found
        finally:
            if cuda:
                torch.cuda.set_sync_debug_mode("default")
    found.extend(w for w in caught if "synchroniz" in str(w.message))


def _where(filename: str, lineno: int) -> str:
    path = Path(filename)
    with contextlib.suppress(ValueError):
        return f"{path.resolve().relative_to(REPO)}:{lineno}"
    parts = path.parts
    if "site-packages" in parts:
        return f"{'/'.join(parts[parts.index('site-packages') + 1 :])}:{lineno}"
    return f"{path.name}:{lineno}"


def probe_syncs(out: Path, dry_run: bool, strategies: str | None = None) -> int:
    """syncs.json: per strategy row, the host syncs of each optimizer step (train_step on one micro-batch, after
    warm-up steps), of the batch's transfer to the device, and the lines that issued them."""
    import torch

    from clue_adv.regularizers.base import Batch
    from clue_adv.train import train_step

    s = _probe_setup(dry_run, strategies)
    device, cuda = s["device"], s["device"].type == "cuda"
    warmup, steps = s["sizes"]["probe_warmup"], s["sizes"]["probe_steps"]
    models = SharedModels(s, s["architecture"])
    results: dict[str, Any] = {}
    for row in s["rows"]:
        try:
            c = s["bench"].build_contender(row, s["architecture"], device, "tnews", 1, model=models.get(row))
            per_step, transfer, forwards, sources = [], [], [], Counter()
            for i in range(warmup + steps):
                raw = s["batches"][i % len(s["batches"])]
                counted = i >= warmup
                with caught_syncs(cuda and counted) as moved:
                    batch = Batch.from_mapping(raw, device)
                c.learner.counter.reset()
                with caught_syncs(cuda and counted) as waited:
                    train_step(c.learner, [batch])
                if counted:
                    per_step.append(len(waited))
                    transfer.append(len(moved))
                    forwards.append(c.learner.counter.forward)
                    sources.update(_where(w.filename, w.lineno) for w in waited)
            results[row.label] = {
                "syncs_per_step": sum(per_step) / steps,
                "per_step": per_step,
                "transfer_syncs_per_step": sum(transfer) / steps,
                "forward_passes": sum(forwards) / steps,
                "sources": {k: v / steps for k, v in sources.most_common()},
            }
            del c
        except Exception as e:  # one strategy's failure is its row's result; the others still run
            results[row.label] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        if cuda:
            torch.cuda.empty_cache()
        print(f"syncs: {row.label}: {results[row.label]}", flush=True)
    base = results.get("none", {}).get("syncs_per_step")
    for row in results.values():
        if "error" not in row and base is not None:
            row["over_none"] = row["syncs_per_step"] - base
    payload = {
        "method": (
            f"torch.cuda.set_sync_debug_mode('warn') around clue_adv.train.train_step on one micro-batch of 32 TNEWS "
            f"titles ({s['sizes']['probe_model']}, the run's precision, AdamW as train.py builds it), counted over "
            f"{steps} steps after {warmup} warm-up steps; the batch's transfer to the device is counted apart. "
            "Each sync is a point where the host waits for the GPU to finish all queued work."
        ),
        "measurable": cuda,
        "device": device.type,
        "strategies": results,
    }
    (out / "syncs.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    return 1 if any("error" in r for r in results.values()) else 0


# Each strategy with its regularizer switched off, so that (step − step off) is the regularizer's share of the
# gradient, while the task-loss part runs in the precision the strategy runs it in (a `none` step would not share
# its rounding). A strategy not listed is compared against a `none` step instead, and the table says so.
REGULARIZER_OFF: dict[str, dict[str, float]] = {
    "consistency": {"weight": 0.0},
    "fgm": {"epsilon": 0.0},
    "freelb": {"adv_lr": 0.0, "init_magnitude": 0.0},
    "gaussian_noise": {"sigma": 0.0},
    "gradient_penalty": {"epsilon": 0.0},
    "jacobian_penalty": {"weight": 0.0},
    "pgd": {"epsilon": 0.0},
    "smart": {"alpha": 0.0, "mu": 0.0},
    "vat": {"alpha": 0.0},
}
# Defaults except where the default has nothing for bf16 to get wrong here: consistency's σ = 0 is dropout-only
# (the probe runs without dropout); the Jacobian penalty at 0.01 is ~1% of the gradient. And the finite-difference
# penalties whose step bf16 cannot resolve when computed in bf16 (ε or h small).
CASE_CHANGES: dict[str, dict[str, Any]] = {"consistency": {"sigma": 0.01}, "jacobian_penalty": {"weight": 0.1}}
EXTRA_CASES: dict[str, dict[str, Any]] = {
    "gradient_penalty[finite_difference, ε 0.01]": {
        "name": "gradient_penalty",
        "mode": "finite_difference",
        "epsilon": 0.01,
    },
    "gradient_penalty[finite_difference, unit h 0.01]": {
        "name": "gradient_penalty",
        "mode": "finite_difference",
        "fd_step": "unit",
        "h": 0.01,
    },
}
AGREEMENT = 0.9


def step_gradient(probe: dict[str, Any], config: dict[str, Any], precision: str) -> Any:
    """The parameter gradient (one flat float64 vector) of one train_step of the strategy `config` in `precision`,
    on the probe's shared model, batch and seeded random draws, leaving the weights as they were."""
    import torch

    from clue_adv.regularizers import registry
    from clue_adv.train import train_step

    bench = probe["bench"]
    row = bench.Row(config["name"], registry()[config["name"]].config_class.model_validate(config))
    model = probe["models"].get(row)
    c = bench.build_contender(row, probe["architecture"], probe["device"], "tnews", 1, model=model, precision=precision)
    for group in c.optimizer.param_groups:
        group["lr"] = 0.0  # the same weights for every gradient (AdamW at lr 0 moves nothing, decay included)
    grads: list[torch.Tensor] = []

    def keep() -> None:
        grads.extend(
            (p.grad if p.grad is not None else torch.zeros_like(p)).detach().flatten().double()
            for p in c.model.parameters()
        )

    torch.manual_seed(1)  # the same random starts, noise and signs in every step
    train_step(c.learner, [probe["batch"]], on_gradients=keep)
    return torch.cat(grads)


def agreement(probe: dict[str, Any], config: dict[str, Any], precisions: tuple[str, str] = ("fp32", "bf16")) -> dict:
    """The regularizer's share of the gradient (the step minus the step with the regularizer off) in the second
    precision against the first: cosine, relative difference, and the share's size against the whole gradient."""
    off = REGULARIZER_OFF.get(config["name"])
    off_config = config | off if off is not None else {"name": "none"}
    reference, other = precisions
    whole = step_gradient(probe, config, reference)
    a = whole - step_gradient(probe, off_config, reference)
    b = step_gradient(probe, config, other) - step_gradient(probe, off_config, other)
    na, nb, whole_norm = float(a.norm()), float(b.norm()), float(whole.norm())
    cosine = float(a @ b) / (na * nb) if na > 0 and nb > 0 else None
    return {
        "config": config,
        "cosine": cosine,
        "agrees": cosine is not None and cosine >= AGREEMENT,  # NaN compares False
        "relative_difference": float((b - a).norm()) / na if na > 0 else None,
        "share_of_gradient": na / whole_norm if whole_norm > 0 else None,
        "off": ", ".join(f"{k}={v}" for k, v in off.items()) if off is not None else "a none step",
    }


def bf16_probe_setup(dry_run: bool, strategies: str | None) -> dict[str, Any]:
    from clue_adv.regularizers.base import Batch

    probe = _probe_setup(dry_run, strategies)
    # No dropout (the draws would differ between the precisions' kernels), and word embeddings at pretrained
    # bert-base-chinese's mean row norm ≈ 1.3 (random init gives ≈ 0.55): bf16 must resolve perturbations against
    # activations of the size a real run has.
    probe["architecture"] |= {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    probe["models"] = SharedModels(probe, probe["architecture"], scale_embeddings_to=1.3)
    probe["batch"] = Batch.from_mapping(probe["batches"][0], probe["device"])
    return probe


def probe_bf16(out: Path, dry_run: bool, strategies: str | None = None) -> int:
    """bf16.json: per case, the cosine between the regularizer's share of the parameter gradient under bf16 autocast
    and in fp32, on the same weights, batch and random draws."""
    import torch

    probe = bf16_probe_setup(dry_run, strategies)
    cases: dict[str, dict[str, Any]] = {}
    for row in probe["rows"]:
        if row.strategy_name != "none":
            cases[row.label] = row.config.model_dump() | CASE_CHANGES.get(row.strategy_name, {})
    names = {row.strategy_name for row in probe["rows"]}
    cases |= {label: config for label, config in EXTRA_CASES.items() if config["name"] in names}
    results: dict[str, Any] = {}
    for label, config in cases.items():
        try:
            results[label] = agreement(probe, config)
        except Exception as e:  # one case's failure is its row's result; the others still run
            results[label] = {"config": config, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        if probe["device"].type == "cuda":
            torch.cuda.empty_cache()
        print(f"bf16: {label}: {results[label]}", flush=True)
    payload = {
        "method": (
            f"Per case, the parameter gradient of one train_step (one micro-batch of 32 TNEWS titles, "
            f"{probe['sizes']['probe_model']} without dropout, word embeddings scaled to row norm 1.3, random draws "
            "seeded alike) minus the same step with the regularizer switched off: the regularizer's share. Under "
            f"bf16 autocast against fp32 on the same weights: the cosine of the two shares (≥ {AGREEMENT} agrees), "
            "their relative difference, and the share's size against the whole fp32 gradient."
        ),
        "device": probe["device"].type,
        "threshold": AGREEMENT,
        "cases": results,
    }
    (out / "bf16.json").write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 1 if any("error" in r for r in results.values()) else 0  # a disagreement is a finding, not a crash


PROBES = {"env": probe_env, "syncs": probe_syncs, "bf16": probe_bf16}


# ------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--output-dir",
        type=Path,
        help="where everything goes (default: results/bench/gpu-check-<UTC date and time>; a new temporary folder "
        "with --dry-run)",
    )
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes: checks the check")
    p.add_argument("--only", help=f"comma-separated steps to run (default all: {','.join(STEP_NAMES)})")
    p.add_argument(
        "--strategies",
        help="comma-separated strategy names or row labels for the probes and the strategy benchmark (default: all; "
        "`none` is always in)",
    )
    p.add_argument("--budget", type=int, default=DEFAULT_BUDGET_S, help="seconds for the whole check")
    p.add_argument("--archive", type=Path, help="also write the folder as one .tar.gz here")
    p.add_argument(
        "--note",
        action="append",
        default=[],
        help="a line for the summary, e.g. the commit where the copy on the GPU machine has no git",
    )
    p.add_argument("--internal", choices=sorted(PROBES), help=argparse.SUPPRESS)  # a step's child process
    args = p.parse_args(argv)
    if args.only:
        unknown = [s for s in args.only.split(",") if s not in STEP_NAMES]
        if unknown:
            p.exit(2, f"error: --only: unknown step {', '.join(unknown)}; the steps: {', '.join(STEP_NAMES)}\n")
    if args.budget <= 0:
        p.exit(2, "error: --budget must be a positive number of seconds\n")
    return args


def default_output_dir(dry_run: bool) -> Path:
    if dry_run:
        return Path(tempfile.mkdtemp(prefix="gpu-check-dry-run-"))
    return RESULTS / f"gpu-check-{datetime.now(timezone.utc):%Y-%m-%d-%H%M}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.internal:
        args.output_dir.mkdir(parents=True, exist_ok=True)
        return PROBES[args.internal](args.output_dir, args.dry_run, args.strategies)
    started = time.monotonic()
    deadline = started + args.budget
    out = (args.output_dir or default_output_dir(args.dry_run)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    selected = set(args.only.split(",")) if args.only else set(STEP_NAMES)
    summary: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + shlex.join([os.path.relpath(__file__, REPO), *(sys.argv[1:] if argv is None else argv)]),
        "dry_run": args.dry_run,
        "budget_s": args.budget,
        "output_dir": str(out),
        "notes": args.note,
        "steps": {},
    }
    print(f"GPU check{' (dry run)' if args.dry_run else ''}: writing to {out}", flush=True)
    no_gpu = False
    for step in STEPS:
        if step.name not in selected and step.name != "env":  # env always: the summary needs the machine
            continue
        left = deadline - time.monotonic()
        if no_gpu or left < MIN_STEP_S:
            why = "no GPU" if no_gpu else f"out of time ({left:.0f} s left of the budget)"
            summary["steps"][step.name] = {"step": step.name, "what": step.what, "status": f"skipped: {why}"}
        else:
            print(f"[{time.monotonic() - started:5.0f} s] {step.name}: {step.what}", flush=True)
            record = run_step(step, out, args.dry_run, min(step.budget_s, left), args.strategies)
            summary["steps"][step.name] = record
            print(f"[{time.monotonic() - started:5.0f} s] {step.name}: {record['status']}", flush=True)
            if step.name == "env" and record["returncode"] == 3:
                no_gpu = True
        summary["wall_time_s"] = round(time.monotonic() - started, 1)
        write_summary(out, summary)
    if args.archive:
        args.archive.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(args.archive, "w:gz") as tar:
            tar.add(out, arcname=out.name)
    print(summary_markdown(summary))
    print(f"wrote {out}" + (f" and {args.archive}" if args.archive else ""))
    if no_gpu:
        print(
            "error: no CUDA device is visible (torch.cuda.is_available() is False); on a machine without a GPU, "
            "check the check with --dry-run",
            file=sys.stderr,
        )
        return 2
    return 0 if all(s["status"] == "ok" for s in summary["steps"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
