"""summary.json: which run, what it ran on, how it ended, its results and its costs (the report reads these)."""

from __future__ import annotations

import math
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

import clue_adv
from clue_adv.config import RunConfig
from clue_adv.errors import RunFailed
from clue_adv.memory import peak_memory
from clue_adv.rundir import summary_header, utc_now
from clue_adv.runstate import LoopState, NonFiniteError, Run

# Printed with an out-of-memory failure and kept in summary.json: the fix that keeps the effective batch.
OOM_ADVICE = "lower batch_size and raise optim.grad_accum_steps to keep the effective batch"


def build_summary(run: Run, state: LoopState, ending: dict[str, Any]) -> dict[str, Any]:
    """The summary of `run` at `state` (`ending`: status and its details). Results of a run that did not complete
    carry `_so_far` names, which the report does not take for a finished result."""
    cfg, status = run.cfg, ending["status"]
    summary = {
        **summary_header(cfg, run.directory, status),
        **run.facts,
        "started_at": state.started_at,
        **{k: v for k, v in ending.items() if k != "status"},
    }
    history = [{k: h[k] for k in ("epoch", "step", "accuracy", "macro_f1", "loss")} for h in state.history]
    best = state.best
    if status == "completed" and best is not None:
        final = state.history[-1]
        summary.update(
            best_dev_accuracy=best["accuracy"],
            best_dev_macro_f1=best["macro_f1"],
            best_epoch=best["epoch"],
            best_step=best["step"],
            final_dev_accuracy=final["accuracy"],
            final_dev_macro_f1=final["macro_f1"],
            final_train_loss=state.epoch_loss_sum / max(state.epoch_examples, 1),
            dev_history=history,
        )
        if state.stopped_early_at:
            summary["stopped_early_at_epoch"], summary["stopped_early_at_step"] = state.stopped_early_at
        if run.diagnostics is not None:
            summary["diagnostics"] = run.diagnostics.results  # {"best": {...}, "final": {...}}
    elif best is not None:
        summary.update(best_dev_accuracy_so_far=best["accuracy"], best_epoch_so_far=best["epoch"], dev_history=history)
    if state.resumed_from:
        summary["resumed_after_epochs"] = state.resumed_from
    if status == "running":
        return summary
    counter = run.learner.counter
    micro_steps = max(math.ceil(state.examples / cfg.batch_size), 1)
    summary.update(
        steps=state.step,
        train_wall_time_s=state.train_time_s,
        eval_wall_time_s=state.eval_time_s,  # not in train_wall_time_s either
        mean_step_time_s=state.mean_step_time_s,
        samples_per_s=state.examples / state.train_time_s if state.train_time_s > 0 else None,
        **peak_memory(run.device),
        passes_per_micro_step={
            "forward": counter.forward / micro_steps,
            "backward": counter.backward / micro_steps,
            "double_backward": counter.double_backward / micro_steps,
        },
    )
    if run.diagnostics is not None:
        summary["diagnostics_wall_time_s"] = run.diagnostics.wall_time_s  # not in train_wall_time_s
    summary["finished_at"] = utc_now()
    return summary


def ending_of(e: BaseException, steps_done: int, directory: Path) -> tuple[dict[str, Any], BaseException | None]:
    """How exception `e` ends the run: the summary's status and details, and what to raise instead (None: `e`)."""
    step = steps_done + 1  # the step that was running
    if isinstance(e, NonFiniteError):  # found when the loop read its steps: it names the step
        error = f"non-finite {e.quantity} at step {e.step}"
        fields = {"status": "failed", "error": error, "failed_step": e.step, "failed_quantity": e.quantity}
        return fields, RunFailed(f"run failed: {error} ({directory})")
    if isinstance(e, torch.OutOfMemoryError):
        fields = {"status": "failed", "error": "out of memory", "failed_step": step, "advice": OOM_ADVICE}
        return fields, RunFailed(f"run failed: out of memory at step {step}: {OOM_ADVICE} ({directory})")
    if isinstance(e, KeyboardInterrupt):
        return {"status": "interrupted", "interrupted_step": steps_done}, None
    return {"status": "failed", "error": f"{type(e).__name__}: {e}", "failed_step": step}, None


def setup_out_of_memory_summary(cfg: RunConfig, directory: Path, device: torch.device) -> dict[str, Any]:
    """The summary of a run that ran out of memory while moving the model or building the optimizer."""
    return {
        **summary_header(cfg, directory, "failed"),
        "error": "out of memory",
        "failed_step": 0,
        "failed_during": "setup",
        "advice": OOM_ADVICE,
        "steps": 0,
        **peak_memory(device),
        "finished_at": utc_now(),
    }


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(clue_adv.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def library_versions() -> dict[str, str]:
    import datasets
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "clue_adv": clue_adv.__version__,
    }
