"""Sweeps on Slurm through submitit: the cells go out as one job array (resources from the sweep's `slurm` block)
and the sweep waits for it; `submitit-local` runs the same path on this machine. Each run directory records its
job (`slurm.json`) and links the job's logs (`slurm.out`, `slurm.err`), so `--status` tells pending from running
and a later sweep waits for a run still in the queue instead of submitting it twice. The wait watches the queue
with squeue (sacct needs accounting, which many clusters lack): a job that leaves it without a result (scancel,
time limit, out of memory) is a failed run, rerun by the next sweep."""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from clue_adv.errors import ClueAdvError
from clue_adv.rundir import atomic_write_json, utc_now
from clue_adv.sweep.outcome import INTERRUPTED_EXIT, CellResult, SweepProgress, SweepResult, log_tail, worker_result
from clue_adv.sweep.plan import Cell, SweepPlan
from clue_adv.sweep.worker import run_cell

SLURM_RECORD = "slurm.json"  # in a run directory: the job last submitted for it (id, log files, submitter)
SLURM_LOGS = {"stdout": "slurm.out", "stderr": "slurm.err"}  # links beside the run's files to that job's logs
# A job that left the queue without a result file: how long to wait for the file anyway (a shared file
# system can show it late) before calling the run failed; and how often to ask squeue.
RESULT_GRACE_S = 15.0
QUEUE_POLL_S = 5.0


def _submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ClueAdvError("--executor slurm needs submitit: pip install 'clue-adv[slurm]'") from None
    return submitit


def slurm_folder(plan: SweepPlan) -> Path:
    """Where submitit keeps the job scripts, pickles and logs (`<folder>/<job id>/`)."""
    s = plan.sweep.slurm
    return (Path(s.log_dir) if s.log_dir else plan.output_dir / plan.experiments[0] / "slurm").absolute()


def sbatch_parameters(plan: SweepPlan) -> dict[str, Any]:
    """The sweep's `slurm` block as submitit SlurmExecutor parameters (sbatch option names)."""
    s = plan.sweep.slurm
    params: dict[str, Any] = {
        "job_name": f"clue-adv-{plan.experiments[0]}",
        "time": s.time_min,
        "cpus_per_task": s.cpus_per_task,
        "gpus_per_node": s.gpus_per_node or None,  # 0: no GPU request at all (CPU partitions may refuse one)
        "mem": f"{s.mem_gb}GB",
        "array_parallelism": s.array_parallelism,
        "partition": s.partition,
        "account": s.account,
        "qos": s.qos,
        "constraint": s.constraint,
        "setup": s.setup or None,
        "additional_parameters": s.additional or None,
    }
    return {k: v for k, v in params.items() if v is not None}


def sbatch_script(plan: SweepPlan, n_tasks: int) -> str:
    """The batch script `--executor slurm` submits for `n_tasks` runs: submitit's own rendering of the
    same parameters, so a dry run shows exactly what sbatch will get."""
    _submitit()
    from submitit.slurm.slurm import _make_sbatch_string

    folder = slurm_folder(plan) / "%j"
    command = f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(folder))}"
    # One run is submitted as a plain job, more as an array (as submitit's map_array does).
    count = n_tasks if n_tasks > 1 else None
    return _make_sbatch_string(command=command, folder=folder, map_count=count, **sbatch_parameters(plan))


def submitit_executor(plan: SweepPlan, cluster: str) -> Any:
    """A submitit executor configured from the sweep's `slurm` block (`cluster`: slurm, local or debug)."""
    submitit = _submitit()
    executor = submitit.AutoExecutor(folder=slurm_folder(plan) / "%j", cluster=cluster)
    params = sbatch_parameters(plan)
    if cluster == "slurm":
        executor.update_parameters(**{f"slurm_{k}": v for k, v in params.items()})
    else:
        s = plan.sweep.slurm
        executor.update_parameters(
            name=params["job_name"],
            timeout_min=s.time_min,
            cpus_per_task=s.cpus_per_task,
            gpus_per_node=min(s.gpus_per_node, torch.cuda.device_count()),  # local: only GPUs it can see
            mem_gb=s.mem_gb,
        )
    return executor


def slurm_queue() -> dict[str, str] | None:
    """This user's jobs and array tasks still in the Slurm queue (`123_4` -> PENDING, RUNNING, ...);
    None where squeue is missing or fails, so that nothing is concluded from silence."""
    if shutil.which("squeue") is None:
        return None
    command = ["squeue", "--noheader", "--array", "--format=%i %T"]
    with contextlib.suppress(Exception):
        command += ["--user", getpass.getuser()]
    try:
        listing = subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    queue: dict[str, str] = {}
    for line in listing.splitlines():
        job, _, state = line.strip().partition(" ")
        packed = re.fullmatch(r"(\d+)_\[([\d,\-]+)(?:%\d+)?\]", job)  # pending tasks some versions keep packed
        if not packed:
            queue[job] = state.strip()
            continue
        for part in packed.group(2).split(","):
            low, _, high = part.partition("-")
            for index in range(int(low), int(high or low) + 1):
                queue[f"{packed.group(1)}_{index}"] = state.strip()
    return queue


def read_slurm_record(directory: Path) -> dict[str, Any] | None:
    try:
        record = json.loads((directory / SLURM_RECORD).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and record.get("job_id") else None


def _record_submission(cell: Cell, job: Any, cluster: str, folder: Path) -> None:
    """The run directory says which job holds it (for --status and for the next sweep) and links that
    job's stdout/stderr beside its files (the links dangle until the job starts)."""
    directory = cell.directory
    directory.mkdir(parents=True, exist_ok=True)
    record = {
        "executor": cluster,
        "job_id": str(job.job_id),
        "folder": str(folder),
        "stdout": str(job.paths.stdout),
        "stderr": str(job.paths.stderr),
        "submitted_at": utc_now(),
    }
    atomic_write_json(directory / SLURM_RECORD, record)
    for key, name in SLURM_LOGS.items():
        link = directory / name
        with contextlib.suppress(OSError):  # a file system without links: the record still names the logs
            link.unlink(missing_ok=True)
            link.symlink_to(os.path.relpath(record[key], directory))


def in_queue(cells: list[Cell], queue: dict[str, str] | None = None) -> dict[Path, tuple[str, dict[str, Any]]]:
    """Cells whose last Slurm job is still queued or running: directory -> (its queue state, its record).
    Such a cell is not submitted again: a second job would write into the same directory."""
    records = {}
    for cell in cells:
        record = read_slurm_record(cell.directory)
        if record and record.get("executor") == "slurm":
            records[cell.directory] = record
    if not records:
        return {}
    queue = slurm_queue() if queue is None else queue
    if not queue:
        return {}
    return {d: (queue[r["job_id"]], r) for d, r in records.items() if r["job_id"] in queue}


@contextlib.contextmanager
def _quiet_submitit() -> Any:
    """submitit warns on every failed sacct call (clusters without accounting); the sweep watches the queue
    with squeue itself, so those warnings are noise."""
    _submitit()  # importing it configures its logger: first, or the level set here is undone
    logger = logging.getLogger("submitit")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def run_submitit(
    plan: SweepPlan,
    cells: list[Cell],
    force: bool,
    cluster: str,
    progress: SweepProgress,
    console: Console,
    queued: list[tuple[Cell, dict[str, Any]]] | None = None,
) -> SweepResult:
    """Submit `cells` as one job array and wait for it, and for `queued` cells (still in the queue from
    an earlier sweep: collected, not submitted again). A job that leaves the queue without a result
    (scancel, time limit, out of memory) is a failed run; its directory says so and the next sweep reruns it."""
    folder = slurm_folder(plan) / "%j"
    jobs: list[Any] = []
    with _quiet_submitit():
        if cells:
            executor = submitit_executor(plan, cluster)
            n = len(cells)
            try:
                jobs = executor.map_array(
                    run_cell,
                    [c.config.resolved() for c in cells],
                    [force] * n,
                    [plan.sweep.slurm.cpus_per_task] * n,
                    [os.getcwd()] * n,
                )
            except Exception as e:  # sbatch missing or refusing (bad partition, account...): say so, no traceback
                raise ClueAdvError(f"could not submit the job array ({cluster}): {type(e).__name__}: {e}") from None
            for cell, job in zip(cells, jobs, strict=True):
                _record_submission(cell, job, cluster, folder)
            ids = sorted({str(j.job_id).split("_")[0] for j in jobs})
            console.print(
                f"submitted {len(jobs)} run(s) as job {', '.join(ids)} ({cluster}); each run's log: "
                f"{'/'.join(SLURM_LOGS.values())} in its directory",
                highlight=False,
            )
        cells = list(cells)
        if queued:
            from submitit.slurm.slurm import SlurmJob

            for cell, record in queued:
                cells.append(cell)
                jobs.append(SlurmJob(folder=record.get("folder", folder), job_id=record["job_id"], tasks=[0]))
            ids = sorted({r["job_id"].split("_")[0] for _, r in queued})
            console.print(
                f"{len(queued)} run(s) already in the queue (job {', '.join(ids)}): waiting for them, "
                "not submitting them again",
                highlight=False,
            )
        return wait_for_jobs(cells, jobs, cluster, progress, console)


def _has_result(job: Any) -> bool:
    with contextlib.suppress(OSError):  # touching the folder refreshes a network file system's view of it
        folder = job.paths.result_pickle.parent
        folder.chmod(folder.stat().st_mode)
    return job.paths.result_pickle.exists()


def wait_for_jobs(
    cells: list[Cell], jobs: list[Any], cluster: str, progress: SweepProgress, console: Console
) -> SweepResult:
    pending = dict(enumerate(jobs))
    starts = {i: time.perf_counter() for i in pending}
    gone: dict[int, float] = {}  # job left the queue (or the scheduler says it ended) without a result file yet
    next_poll = 0.0
    queue: dict[str, str] | None = None
    results: list[CellResult] = []
    try:
        while pending:
            now = time.monotonic()
            if cluster == "slurm" and now >= next_poll:
                # The queue from squeue, not job states from sacct (what submitit asks, and what clusters
                # without accounting do not answer): a job that leaves the queue without a result would
                # otherwise be waited for forever.
                queue = slurm_queue()
                next_poll = now + QUEUE_POLL_S
                if queue is not None:
                    for i, job in pending.items():
                        if str(job.job_id) not in queue:
                            gone.setdefault(i, now)
            for i, job in list(pending.items()):
                cell, seconds = cells[i], time.perf_counter() - starts[i]
                if cluster == "slurm" and queue is not None:
                    ended = _has_result(job)
                else:  # submitit's own check (local processes; sacct where squeue failed)
                    ended = job.done()
                if ended and _has_result(job):
                    try:
                        outcome = job.result()
                    except Exception as e:  # the job itself failed (exception, timeout, preemption, node failure)
                        result = worker_result(cell, 1, seconds)
                        if result.status == "failed" and not result.summary.get("error"):
                            result.error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1][-300:]}"
                    else:
                        returncode = {"failed": 1, "interrupted": INTERRUPTED_EXIT}.get(outcome["status"], 0)
                        result = worker_result(cell, returncode, seconds)
                        if outcome["status"] == "skipped":
                            result.status = "skipped"
                elif ended or i in gone:
                    if time.monotonic() - gone.setdefault(i, time.monotonic()) < RESULT_GRACE_S:
                        continue
                    why = f"job {job.job_id} ended without a result (cancelled, timed out, out of memory, node failure)"
                    tail = log_tail(Path(job.paths.stderr))
                    why += f"; its log ends: {tail}" if tail else ""
                    result = worker_result(cell, 1, seconds, fallback=why)
                else:
                    continue
                del pending[i]
                results.append(result)
                progress.finished(result)
            if pending:
                time.sleep(1.0 if cluster == "slurm" else 0.2)
    except KeyboardInterrupt:
        ids = sorted({str(j.job_id).split("_")[0] for j in pending.values()})
        console.print(
            f"stopped waiting; {len(pending)} run(s) keep going in job {', '.join(ids)} "
            f"(scancel {' '.join(ids)} to stop them; rerun the sweep to collect and resume)",
            highlight=False,
        )
        return SweepResult(results, interrupted=True)
    return SweepResult(results)
