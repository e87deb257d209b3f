"""A fixture that starts the single-node Slurm of scripts/local-slurm.sh, or skips with the reason."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "local-slurm.sh"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "a local Slurm needs root (munged/slurmd run as root here)"
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch", "squeue", "scancel") if shutil.which(b) is None]
    if missing:
        return f"Slurm/munge not installed ({', '.join(missing)} missing): run scripts/local-slurm.sh install"
    return None


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _free_port_pair() -> int:
    """slurmctld's port (slurmd takes the next): not the default 6817, so that a cluster someone else
    started on this machine (another test session, another checkout) is never the one we talk to."""
    for _ in range(100):
        port = random.randrange(20000, 60000, 2)
        if _free(port) and _free(port + 1):
            return port
    raise RuntimeError("no two free consecutive ports")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Yields the SLURM_CONF path (also exported for child processes); stops the daemons afterwards."""
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    state = tmp_path_factory.mktemp("slurm")
    env = {
        **os.environ,
        "CLUE_ADV_SLURM_DIR": str(state),
        "CLUE_ADV_SLURM_WAIT": "60",
        "CLUE_ADV_SLURM_PORT": str(_free_port_pair()),
    }
    try:
        started = subprocess.run([SCRIPT, "start"], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        subprocess.run([SCRIPT, "stop"], env=env, capture_output=True, timeout=60)
        pytest.skip("the local Slurm did not come up within 120 s")
    if started.returncode != 0:
        subprocess.run([SCRIPT, "stop"], env=env, capture_output=True, timeout=60)
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
