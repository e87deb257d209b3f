"""Sweeps: a grid of runs (tasks x strategies x hyperparameter values x seeds), one run directory each. Every
cell is a full RunConfig, validated before anything runs, in the directory `clue-adv train` would use, so a
sweep resumes where it stopped and `clue-adv report` reads the result.

config: the sweep file's schema; plan: the cells; outcome: how an attempt ended; local: this machine (in
process, or a worker process per cell); worker: one cell in its own process (`python -m clue_adv.sweep`);
slurm: a job array through submitit; run: `run_sweep`; status: `sweep --status`.
"""

from clue_adv.config import check_key  # moved to config
from clue_adv.memory import SHARED_PROCESS_MEMORY_NOTE  # moved to memory
from clue_adv.sweep.config import MAX_RUNS, MAX_SEEDS, SlurmConfig, SweepConfig, Task, load_sweep
from clue_adv.sweep.local import MAX_JOBS, available_cores, core_sets, worker_gpus
from clue_adv.sweep.outcome import CellResult, SweepProgress, SweepResult, record_setup_failure
from clue_adv.sweep.plan import Cell, SweepPlan, load_plan, plan_data_problems, plan_sweep
from clue_adv.sweep.run import EXECUTORS, MANIFEST, check_executor, run_sweep, submission, write_manifests
from clue_adv.sweep.slurm import (
    QUEUE_POLL_S,
    RESULT_GRACE_S,
    SLURM_LOGS,
    SLURM_RECORD,
    in_queue,
    read_slurm_record,
    sbatch_parameters,
    sbatch_script,
    slurm_folder,
    slurm_queue,
    submitit_executor,
)
from clue_adv.sweep.status import STATUS_ORDER, CellStatus, sweep_status
from clue_adv.sweep.worker import run_cell, worker_main

__all__ = [
    "EXECUTORS",
    "MANIFEST",
    "MAX_JOBS",
    "MAX_RUNS",
    "MAX_SEEDS",
    "QUEUE_POLL_S",
    "RESULT_GRACE_S",
    "SLURM_LOGS",
    "SHARED_PROCESS_MEMORY_NOTE",
    "SLURM_RECORD",
    "STATUS_ORDER",
    "Cell",
    "CellResult",
    "CellStatus",
    "SlurmConfig",
    "SweepConfig",
    "SweepPlan",
    "SweepProgress",
    "SweepResult",
    "Task",
    "available_cores",
    "check_executor",
    "check_key",
    "core_sets",
    "in_queue",
    "load_plan",
    "load_sweep",
    "plan_data_problems",
    "plan_sweep",
    "read_slurm_record",
    "record_setup_failure",
    "run_cell",
    "run_sweep",
    "sbatch_parameters",
    "sbatch_script",
    "slurm_folder",
    "slurm_queue",
    "submission",
    "submitit_executor",
    "sweep_status",
    "worker_gpus",
    "worker_main",
    "write_manifests",
]
