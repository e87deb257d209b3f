"""One cell in a process of its own: `worker_main` is `python -m clue_adv.sweep CONFIG.yaml [--force]`, the
local parallel executor's worker; `run_cell` is what a submitit job (Slurm or submitit-local) runs."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from clue_adv.config import RunConfig, load_yaml, parse_config
from clue_adv.errors import ClueAdvError, handle_sigint, sigterm_as_interrupt
from clue_adv.rundir import run_dir
from clue_adv.sweep.local import GIVEN_GPU_VAR, available_cores
from clue_adv.sweep.outcome import INTERRUPTED_EXIT, attempt
from clue_adv.sweep.plan import Cell


def _stop_with_the_sweep() -> None:
    """Ask the kernel to send SIGINT to this worker when the sweep that started it dies, even by kill -9.

    Workers run in their own session (so a terminal's Ctrl-C reaches the sweep only), so nothing else would
    stop them: they would train on, and a rerun of the sweep would start a second writer into the same run
    directory. SIGINT, not SIGKILL: the run is then marked interrupted with whole files, and the next sweep
    reruns it. Linux only (prctl); the sweep runs its workers from its main thread, as PR_SET_PDEATHSIG needs.
    """
    parent = os.environ.get("CLUE_ADV_PARENT_PID")
    if not parent or not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGINT)
    if os.getppid() != int(parent):  # the sweep died before prctl took effect
        raise KeyboardInterrupt


def missing_gpu() -> str | None:
    """Why this worker cannot use the GPU the sweep gave it (None: it can, or it was given none). A run given a GPU
    fails instead of training on the CPU, which `device: auto` would quietly do."""
    given = os.environ.get(GIVEN_GPU_VAR)
    if not given:
        return None
    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return None
    return (
        f"this run was given GPU {given} (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}) "
        "but CUDA sees no device in its process; it was not trained on the CPU instead"
    )


def worker_main(argv: list[str]) -> int:
    """Train one resolved config; exit 0 completed, 1 failed, 2 bad input, 130 interrupted."""
    handle_sigint()
    try:
        _stop_with_the_sweep()
    except KeyboardInterrupt:
        return INTERRUPTED_EXIT
    cpus = os.environ.get("CLUE_ADV_CPUS")
    if cpus:
        with contextlib.suppress(AttributeError, OSError, ValueError):
            os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
        torch.set_num_threads(len(cpus.split(",")))
    console = Console(stderr=True, soft_wrap=True)
    # Into the cell's train.log: which cores and GPU this worker was given, to check --devices/--jobs pinning.
    with contextlib.suppress(AttributeError, OSError):
        affinity = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
        console.print(
            f"worker: cpus {affinity} ({torch.get_num_threads()} threads), "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}",
            highlight=False,
            markup=False,
        )
    try:
        # The sweep's resolved config, its paths already from the sweep's working directory (which this worker
        # shares): read as is, not as a config file whose paths are relative to its own (temporary) folder.
        cfg = parse_config(load_yaml(Path(argv[0])), source=argv[0])
    except ClueAdvError as e:
        console.print(f"error: {e}", highlight=False, markup=False)
        return e.exit_code
    if (missing := missing_gpu()) is not None:  # the sweep records the failed run with this line
        console.print(f"error: {missing}", highlight=False, markup=False)
        return 1
    cell = Cell(cfg, run_dir(cfg).resolve(), "absent")
    # The sweep records a failed setup itself, with what this worker printed (it also sees a worker killed).
    with sigterm_as_interrupt():
        run = attempt(cell, "--force" in argv[1:], record_setup=False, show_progress=False, console=console)
    if run.status == "interrupted":
        console.print("interrupted", highlight=False)
    elif run.status == "failed":
        console.print(f"error: {run.error}", highlight=False, markup=False)
    else:
        console.print(f"done: {run.directory}", highlight=False, markup=False)
    return run.exit_code


def run_cell(
    resolved: dict[str, Any], force: bool = False, threads: int | None = None, cwd: str | None = None
) -> dict[str, Any]:
    """One cell, in whatever process runs it (a submitit job); picklable by reference. `threads`: the
    job's CPU allocation; torch would otherwise start one thread per core it can see on the node. `cwd`:
    the sweep's working directory, which relative paths in the config (data.path) are relative to."""
    if cwd and os.path.isdir(cwd):
        os.chdir(cwd)
    if threads:
        torch.set_num_threads(max(1, min(threads, len(available_cores()))))
    cfg = RunConfig.model_validate(resolved)
    cell = Cell(cfg, run_dir(cfg).resolve(), "absent")
    run = attempt(cell, force, show_progress=False)
    return {"status": run.status, "directory": str(run.directory or cell.directory), "error": run.error}
