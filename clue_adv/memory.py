"""A run's peak memory, as its summary reports it: GPU allocations on CUDA (and what the caching allocator held);
on the CPU the peak resident memory of the run's process, which a one-job sweep shares between its runs and so
resets before each (where Linux lets it), or else leaves unrecorded. And giving memory back between the runs of
one process."""

from __future__ import annotations

import gc
import resource
from pathlib import Path
from typing import Any

import torch

from clue_adv.rundir import atomic_write_json

PROC_CLEAR_REFS = Path("/proc/self/clear_refs")
SHARED_PROCESS_MEMORY_NOTE = (
    "not measured: this run shared its process with an earlier run (a one-job sweep), and on the CPU peak "
    "memory is the process's peak resident memory, which includes the earlier runs' (this system cannot reset "
    "it between runs); run with --jobs 2 or more (one process per run) to measure it"
)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # VmHWM (Linux) is the process's peak resident memory since the last reset (a sweep writes "5" to
    # /proc/self/clear_refs before each in-process run); ru_maxrss is the peak since the process started.
    peak = process_peak_rss_mb()
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def peak_memory(device: torch.device) -> dict[str, float]:
    """summary.json's peak memory fields: `peak_memory_mb`, and on CUDA `peak_memory_reserved_mb`, the peak the
    caching allocator held from the driver (allocations plus its cache and fragmentation): what other processes on
    the GPU could not have, and what an out-of-memory error compares against."""
    fields = {"peak_memory_mb": peak_memory_mb(device)}
    if device.type == "cuda":
        fields["peak_memory_reserved_mb"] = torch.cuda.max_memory_reserved(device) / 2**20
    return fields


def release_memory() -> None:
    """Give a finished run's memory back before the next run in this process: collect what only reference cycles
    still hold (a failed run's traceback holds its frames, and their model), then return the CUDA allocator's cached
    blocks to the driver, so the next run starts with the whole GPU (after an out-of-memory failure especially)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def process_peak_rss_mb() -> float | None:
    """This process's peak resident memory since the last reset (VmHWM, MiB), or None where unreadable."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (VmHWM) to its current one, which `peak_memory_mb` then reports
    as the next run's peak; False where that is not possible (not Linux, a kernel or sandbox that refuses it)."""
    try:
        # "5" resets only the high-water mark; it leaves page-table bits and the memory itself alone.
        PROC_CLEAR_REFS.write_text("5", encoding="ascii")
    except OSError:
        return False
    return process_peak_rss_mb() is not None


def correct_cpu_peak_memory(directory: Path, summary: dict[str, Any], shared: bool, reset: bool) -> dict[str, Any]:
    """A completed CPU run whose process's peak could not be reset before it (`reset` False) and that shared its
    process with an earlier run (`shared`): peak_memory_mb becomes null, with peak_memory_note saying why. After
    a reset, train's figure (VmHWM since the reset) is already the run's own; CUDA peaks are reset per run."""
    on_cpu = str(summary.get("device", "")).startswith("cpu")
    if reset or not shared or not on_cpu or summary.get("status") != "completed":
        return summary
    if summary.get("peak_memory_mb") is None:
        return summary
    summary = {**summary, "peak_memory_mb": None, "peak_memory_note": SHARED_PROCESS_MEMORY_NOTE}
    atomic_write_json(directory / "summary.json", summary)
    return summary
