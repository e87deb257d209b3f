"""Running cells on this machine. One job runs them in this process, one after the other, and shows each run's
own progress bar under the sweep's. More jobs (`--jobs`, or any `--devices`) run each cell in a worker process
(`python -m clue_adv.sweep`): a crash or an out-of-memory kill in one run cannot take the sweep down; each worker
gets its share of the CPU cores (threads and affinity) and, with `devices`, one GPU (CUDA_VISIBLE_DEVICES): `devices`
are indices among the GPUs this sweep sees (`worker_gpus` maps and checks them before anything runs)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from clue_adv.config import dump_config
from clue_adv.errors import ClueAdvError, sigterm_as_interrupt
from clue_adv.memory import correct_cpu_peak_memory, release_memory, reset_peak_rss
from clue_adv.rundir import open_in_run_dir, read_summary, utc_now
from clue_adv.sweep.outcome import (
    INTERRUPTED_EXIT,
    SESSION_MARK,
    CellResult,
    SweepProgress,
    SweepResult,
    attempt,
    worker_result,
)
from clue_adv.sweep.plan import Cell

MAX_JOBS = 256  # parallel local workers; more is a typo (each gets a process and a share of the cores)
WORKER_MODULE = "clue_adv.sweep"  # `python -m clue_adv.sweep CONFIG.yaml [--force]`: sweep/__main__.py
# Set in a worker's environment to the GPU it was given: the worker then refuses to run without CUDA rather than let
# `device: auto` train on the CPU (a driver missing, a GPU taken away).
GIVEN_GPU_VAR = "CLUE_ADV_GIVEN_GPU"


def core_sets(cores: list[int], jobs: int) -> list[list[int]]:
    """Split the cores between `jobs` workers: disjoint sets of (nearly) equal size; with more workers
    than cores, workers share cores round-robin."""
    if jobs <= len(cores):
        size, extra = divmod(len(cores), jobs)
        out, start = [], 0
        for k in range(jobs):
            n = size + (1 if k < extra else 0)
            out.append(cores[start : start + n])
            start += n
        return out
    return [[cores[k % len(cores)]] for k in range(jobs)]


def available_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return list(range(os.cpu_count() or 1))


def worker_gpus(devices: list[str], cells: list[Cell] | None = None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value each `--devices` index gives a worker, checked before anything runs (exit 2).

    The indices count the GPUs this sweep sees: under an inherited CUDA_VISIBLE_DEVICES (Slurm and most schedulers
    set it to the job's GPUs) index k is that list's k-th entry, so `--devices 0,1` stays on the job's GPUs instead of
    physical GPUs 0 and 1. An index beyond the GPUs present, or any index on a machine without CUDA, is refused:
    the workers would otherwise see no GPU and train on the CPU (`device: auto`), or share someone else's."""
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = [d.strip() for d in inherited.split(",")] if inherited is not None else None
    present = torch.cuda.device_count()
    if visible is not None:  # CUDA stops at the first entry it cannot use: the list may promise more than there is
        present = min(present, len([d for d in visible if d]))
    given = ",".join(devices)
    inherited_note = f" (CUDA_VISIBLE_DEVICES={inherited} is inherited: --devices indexes into it)" if visible else ""
    if present == 0:
        why = f"CUDA_VISIBLE_DEVICES={inherited!r} hides every GPU" if visible is not None else "CUDA finds no GPU"
        raise ClueAdvError(f"--devices {given}: this machine has no GPU to give the runs ({why}); nothing was run")
    indices = []
    for device in devices:
        if not device.isdigit():
            raise ClueAdvError(f"--devices: {device!r} is not a GPU index (0-based, e.g. --devices 0,1)")
        if int(device) >= present:
            raise ClueAdvError(
                f"--devices {given}: there is no GPU {device}; {present} GPU(s) are visible, "
                f"indices 0 to {present - 1}{inherited_note}; nothing was run"
            )
        indices.append(int(device))
    on_cpu = [c.name for c in cells or [] if c.config.device == "cpu"]
    if on_cpu:
        raise ClueAdvError(
            f"--devices gives each run a GPU, but {len(on_cpu)} run(s) set device: cpu (e.g. {on_cpu[0]}); "
            "run them without --devices, or set device: auto"
        )
    return [visible[i] if visible is not None else str(i) for i in indices]


# Whether this process has trained a run already: on the CPU a run's peak memory is the process's peak resident
# memory, which never goes down by itself, so a later run in the same process would report an earlier run's peak
# as its own unless that peak is reset (Linux: /proc/self/clear_refs) before each run.
_trained_in_this_process = False


def run_in_process(cells: list[Cell], force: bool, progress: SweepProgress, console: Console) -> SweepResult:
    global _trained_in_this_process
    results: list[CellResult] = []
    with sigterm_as_interrupt():
        for cell in cells:
            progress.started(cell)
            start = time.perf_counter()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()  # each run reports its own peak, not the sweep's so far
            reset = reset_peak_rss()  # likewise on the CPU, where the system allows it
            # Any attempt counts, a failed one too: it may have raised the process's peak before failing.
            shared, _trained_in_this_process = _trained_in_this_process, True
            run = attempt(cell, force, contain_bugs=True, show_progress=progress.bar or None, console=console)
            release_memory()  # the next run gets the whole GPU, not what this one's allocator still caches
            summary = run.summary
            if run.status == "skipped":
                _trained_in_this_process = shared  # nothing was loaded: the process's peak is unchanged
            elif run.status == "completed" and run.directory is not None:
                summary = read_summary(run.directory) or summary
                summary = correct_cpu_peak_memory(run.directory, summary, shared, reset)
            result = CellResult(cell, run.status, time.perf_counter() - start, run.error, summary)
            results.append(result)
            progress.finished(result)
            if run.status == "interrupted":
                return SweepResult(results, interrupted=True)
    return SweepResult(results)


def run_subprocesses(
    cells: list[Cell], force: bool, jobs: int, gpus: list[str] | None, progress: SweepProgress
) -> SweepResult:
    """Each cell in a worker process, `jobs` at once; `gpus`: the CUDA_VISIBLE_DEVICES values from `worker_gpus`,
    given to the workers in turn."""
    slots = core_sets(available_cores(), jobs)
    queue = deque(cells)
    running: dict[int, tuple[subprocess.Popen, Cell, float, Path, Any]] = {}
    results: list[CellResult] = []
    interrupted = False
    with sigterm_as_interrupt(), tempfile.TemporaryDirectory(prefix="clue-adv-sweep-") as tmp:
        try:
            while queue or running:
                for slot in range(jobs):
                    if slot in running or not queue:
                        continue
                    cell = queue.popleft()
                    config_file = Path(tmp) / f"cell-{len(results) + len(running)}-{slot}.yaml"
                    config_file.write_text(dump_config(cell.config), encoding="utf-8")
                    env = dict(os.environ)
                    cpus = slots[slot]
                    env.update(
                        CLUE_ADV_CPUS=",".join(map(str, cpus)),
                        OMP_NUM_THREADS=str(len(cpus)),
                        MKL_NUM_THREADS=str(len(cpus)),
                        TOKENIZERS_PARALLELISM="false",
                        CLUE_ADV_PARENT_PID=str(os.getpid()),
                    )
                    where = ""
                    if gpus:
                        env["CUDA_VISIBLE_DEVICES"] = env[GIVEN_GPU_VAR] = gpus[slot % len(gpus)]
                        where = f" on GPU {env['CUDA_VISIBLE_DEVICES']}"
                    cell.directory.mkdir(parents=True, exist_ok=True)
                    log = cell.directory / "train.log"
                    if log.is_symlink():  # a link planted here is removed, never written through
                        log.unlink()
                    # Appended: a resumed run keeps its earlier sessions' output (a forced rerun starts afresh);
                    # each session opens with a mark, and log_tail reads the latest session only.
                    log_file = open_in_run_dir(log, "w" if force else "a")  # closed when the worker ends
                    log_file.write(f"{SESSION_MARK} {utc_now()}\n")
                    log_file.flush()
                    command = [sys.executable, "-m", WORKER_MODULE, str(config_file)]
                    command += ["--force"] if force else []
                    # Own session: Ctrl-C reaches the sweep only, which forwards it once to each worker.
                    proc = subprocess.Popen(
                        command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True
                    )
                    running[slot] = (proc, cell, time.perf_counter(), log, log_file)
                    progress.started(cell, where)
                for slot, (proc, cell, start, log, log_file) in list(running.items()):
                    if proc.poll() is None:
                        continue
                    log_file.close()
                    del running[slot]
                    result = worker_result(cell, proc.returncode, time.perf_counter() - start, log)
                    results.append(result)
                    progress.finished(result)
                time.sleep(0.2)
        except KeyboardInterrupt:
            interrupted = True
            for proc, *_ in running.values():
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 60
            for slot, (proc, cell, start, log, log_file) in running.items():
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                log_file.close()
                result = worker_result(cell, proc.returncode, time.perf_counter() - start, log)
                if result.status == "failed" and proc.returncode in (INTERRUPTED_EXIT, -signal.SIGINT, -signal.SIGKILL):
                    result.status = "interrupted"
                results.append(result)
                progress.finished(result)
    return SweepResult(results, interrupted)
