"""A fixture that starts the single-node Slurm of scripts/local-slurm.sh, or skips with the reason."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "local-slurm.sh"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "a local Slurm needs root (munged/slurmd run as root here)"
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if shutil.which(b) is None]
    if missing:
        return f"Slurm/munge not installed ({', '.join(missing)} missing): run scripts/local-slurm.sh install"
    return None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Yields the SLURM_CONF path (also exported for child processes); stops the daemons afterwards."""
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "CLUE_ADV_SLURM_DIR": str(state), "CLUE_ADV_SLURM_WAIT": "60"}
    try:
        started = subprocess.run([SCRIPT, "start"], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.skip("the local Slurm did not come up within 120 s")
    if started.returncode != 0:
        pytest.skip(f"the local Slurm did not start: {started.stderr.strip()[-500:]}")
    conf = str(state / "slurm.conf")
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield conf
    finally:
        subprocess.run([SCRIPT, "stop"], env=env, capture_output=True, timeout=60)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
