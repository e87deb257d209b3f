"""`run_sweep`: the manifest of what was planned, then the cells not completed yet on the executor the user chose
(this process, worker processes, or a Slurm job array). Failures do not stop a sweep; it resumes where it stopped,
since completed runs with the same config are skipped and failed or interrupted ones rerun."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console

from clue_adv.errors import ClueAdvError
from clue_adv.rundir import SWEEP_MANIFEST, atomic_write_json, identity, manifest_invocations, utc_now
from clue_adv.runenv import host_facts
from clue_adv.sweep.local import MAX_JOBS, run_in_process, run_subprocesses, worker_gpus
from clue_adv.sweep.outcome import CellResult, SweepProgress, SweepResult
from clue_adv.sweep.plan import Cell, SweepPlan
from clue_adv.sweep.slurm import in_queue, run_submitit

EXECUTORS = ("local", "slurm", "submitit-local")
MANIFEST = SWEEP_MANIFEST


def check_executor(executor: str) -> None:
    """`--executor`, checked by the CLI before planning and by `run_sweep` for other callers."""
    if executor not in EXECUTORS:
        raise ClueAdvError(f"--executor: unknown executor {executor!r} (valid: {', '.join(EXECUTORS)})")


def submission(plan: SweepPlan, force: bool = False) -> tuple[list[Cell], dict[Path, tuple[str, dict[str, Any]]]]:
    """The cells a sweep starts now, and those it leaves alone because their Slurm job from an earlier
    sweep is still queued or running (directory -> (queue state, record)); with `--force` too, since a
    second job would write into the same directory."""
    candidates = list(plan.cells) if force else [c for c in plan.cells if not c.done]
    queued = in_queue(candidates)
    return [c for c in plan.to_run(force) if c.directory not in queued], queued


MAX_INVOCATIONS = 200  # a manifest keeps the latest ones: a sweep resumed daily for years stays a small file


def _earlier_manifest(path: Path, experiment: str) -> dict[str, Any]:
    """The experiment's previous manifest (empty when it is missing, unreadable or another experiment's)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    return data if isinstance(data, dict) and data.get("experiment") == experiment else {}


def _other_sweeps_cells(earlier: dict[str, Any], source: str, planned: set[str]) -> list[dict[str, Any]]:
    """The cells another sweep file planned into the same experiment (the proxy study's tier 1 and tier 2 share
    one), kept so the report still tells their unstarted cells; a cell this plan also names is this plan's. A
    cell from before cells recorded their sweep file belongs to the manifest's `sweep`."""
    cells = earlier.get("cells")
    kept = []
    for cell in cells if isinstance(cells, list) else []:
        if not isinstance(cell, dict) or not isinstance(cell.get("run_dir"), str):
            continue
        owner = cell.get("sweep", earlier.get("sweep"))
        if owner != source and cell["run_dir"] not in planned:
            kept.append({"sweep": owner, **cell})
    return kept


def write_manifests(plan: SweepPlan, invocation: dict[str, Any] | None = None) -> list[Path]:
    """Write `<output>/<experiment>/sweep.json` for each experiment of the plan: every planned cell (its run
    directory relative to the experiment's, its identity and its sweep file), so that the report can tell a cell
    that never started from one that was never planned. Each sweep file's latest plan is its plan (a rerun replaces
    its own cells); an experiment's plan is the union over the sweep files that planned into it. `invocation`
    (the command line, the machine, the date) is appended to those the previous manifest of the experiment
    recorded: a study's runs come from several sweeps and sessions, and its report says which."""
    written = []
    for experiment in plan.experiments:
        cells = [c for c in plan.cells if c.config.experiment == experiment]
        # Cells of one experiment share <output>/<experiment>/ (run_dir's layout); taken from a cell, not
        # plan.output_dir, so that a cell's own output_dir is honoured.
        root = cells[0].directory.parents[2]
        entries = []
        for cell in cells:
            try:
                relative = cell.directory.relative_to(root).as_posix()
            except ValueError:  # a cell with another output_dir: its own manifest is not written here
                continue
            entries.append(
                {
                    "sweep": plan.source,
                    "run_dir": relative,
                    "task": cell.config.task,
                    "strategy": cell.config.strategy.name,
                    "strategy_tag": cell.directory.parent.name,
                    "seed": cell.config.seed,
                    "identity": identity(cell.config.resolved()),
                }
            )
        manifest: dict[str, Any] = {"experiment": experiment, "sweep": plan.source, "written_at": utc_now()}
        earlier = _earlier_manifest(root / MANIFEST, experiment)
        invocations = manifest_invocations(earlier)
        if invocation is not None:
            invocations = [*invocations, {"sweep": plan.source, **invocation}][-MAX_INVOCATIONS:]
        if invocations:
            manifest["invocations"] = invocations
        planned = {e["run_dir"] for e in entries}
        manifest["cells"] = _other_sweeps_cells(earlier, plan.source, planned) + entries
        try:
            atomic_write_json(root / MANIFEST, manifest)
        except OSError as e:
            raise ClueAdvError(f"cannot write the sweep manifest {root / MANIFEST}: {e.strerror or e}") from None
        written.append(root / MANIFEST)
    return written


def run_sweep(
    plan: SweepPlan,
    *,
    force: bool = False,
    jobs: int | None = None,
    devices: list[str] | None = None,
    executor: str = "local",
    console: Console | None = None,
    show_progress: bool | None = None,
    command: str | None = None,
) -> SweepResult:
    """Run the cells that are not completed yet (all with `force`). Failures do not stop the sweep. `command`: the
    command line that started it, recorded in the manifest with the machine and the date."""
    console = console or Console(stderr=True)
    check_executor(executor)
    if devices is not None and not devices:
        raise ClueAdvError("--devices: give device ids, e.g. --devices 0,1,2,3")
    jobs = jobs if jobs is not None else (len(devices) if devices else 1)
    if jobs < 1:
        raise ClueAdvError("--jobs must be at least 1")
    if jobs > MAX_JOBS:
        raise ClueAdvError(f"--jobs {jobs}: at most {MAX_JOBS} runs at once")
    if executor != "local" and (devices or jobs > 1):
        console.print(
            f"note: --devices/--jobs place runs on this machine; with --executor {executor} the scheduler places "
            "them (resources: the sweep's `slurm:` block)",
            highlight=False,
        )
    elif devices and jobs > len(devices):
        console.print(
            f"note: --jobs {jobs} over {len(devices)} device(s): up to {math.ceil(jobs / len(devices))} runs share "
            "a GPU (its memory and time); one run per device is --jobs equal to the number of devices",
            highlight=False,
        )
    # Before anything runs: an index that is not a GPU here must not become a worker that trains on the CPU.
    gpus = worker_gpus(devices, plan.cells) if devices and executor == "local" else None
    invocation = {"command": command, "at": utc_now(), "executor": executor, "jobs": jobs, "devices": devices}
    write_manifests(plan, invocation | {"host": host_facts()})
    todo, queued = submission(plan, force)
    skipped = [CellResult(c, "skipped") for c in plan.cells if c not in todo and c.directory not in queued]
    if queued and executor != "slurm":
        ids = sorted({record["job_id"].split("_")[0] for _, record in queued.values()})
        console.print(
            f"{len(queued)} run(s) are still in the Slurm queue (job {', '.join(ids)}): not run here; "
            f"see `clue-adv sweep --status`, or scancel {' '.join(ids)} and rerun",
            highlight=False,
        )
    progress = SweepProgress(len(plan.cells), len(skipped), console, show_progress)
    with progress:
        if executor == "slurm" and (todo or queued):
            waiting = [(c, queued[c.directory][1]) for c in plan.cells if c.directory in queued]
            result = run_submitit(plan, todo, force, "slurm", progress, console, waiting)
        elif not todo:
            result = SweepResult([])
        elif executor != "local":
            result = run_submitit(plan, todo, force, "local", progress, console)
        elif jobs == 1 and not devices:
            result = run_in_process(todo, force, progress, console)
        else:
            result = run_subprocesses(todo, force, jobs, gpus, progress)
    result.results = skipped + result.results
    return result
