"""Integration with a real single-node Slurm (started by the fixture; skipped with a reason where impossible)."""

from __future__ import annotations

import subprocess
import time

import pytest
from slurm_cluster import slurm_cluster  # noqa: F401 - fixture

pytestmark = pytest.mark.slurm


def _wait_gone(job_id: str, timeout: float = 60) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still queued after {timeout} s")


def test_the_local_cluster_runs_a_job_array(slurm_cluster, tmp_path):  # noqa: F811
    out = tmp_path / "task-%a.out"
    job = subprocess.run(
        ["sbatch", "--parsable", "--array=0-2", "-o", str(out), "--wrap", "echo task $SLURM_ARRAY_TASK_ID"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    _wait_gone(job)
    assert sorted((tmp_path / f"task-{i}.out").read_text().strip() for i in range(3)) == [
        "task 0",
        "task 1",
        "task 2",
    ]
