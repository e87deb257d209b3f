"""One training run, for every strategy: setup in dependency order, the loop, evaluation, run files.

The loop asks the strategy for the step's gradients (`training_step`) and then steps the optimizer; it
never looks at the strategy's name. Setup (tokenizer, data, model) finishes before the run directory is
touched, so a bad path or label fails without leaving anything behind.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import resource
import shutil
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import clue_adv
from clue_adv.config import RunConfig, require_nameable
from clue_adv.data import eval_loader, load_task_data, train_loader
from clue_adv.errors import ClueAdvError, ConfigError, RunFailed
from clue_adv.evaluate import evaluate
from clue_adv.model import (
    build_model,
    build_tokenizer,
    check_vocab_size,
    looks_local,
    parameter_groups,
    special_token_ids,
)
from clue_adv.progress import RunProgress
from clue_adv.regularizers import build_strategy
from clue_adv.regularizers.base import Batch, PassCounter, StepContext
from clue_adv.rundir import (
    JsonlWriter,
    atomic_write_json,
    check_writable,
    existing_state,
    release_run_lock,
    run_dir,
    start_run,
)


class NonFiniteError(Exception):
    def __init__(self, step: int, quantity: str) -> None:
        super().__init__(f"non-finite {quantity} at step {step}")
        self.step = step
        self.quantity = quantity


@dataclass
class RunOutcome:
    directory: Path
    summary: dict[str, Any]
    skipped: bool = False


# Printed with an out-of-memory failure and kept in summary.json: the fix that keeps the effective batch.
OOM_ADVICE = "lower batch_size and raise optim.grad_accum_steps to keep the effective batch"


def all_sources_local(cfg: RunConfig) -> bool:
    names = [cfg.model.name_or_path, cfg.model.tokenizer or cfg.model.name_or_path]
    return cfg.data.is_local and all(looks_local(n) for n in names)


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def configure_environment(cfg: RunConfig) -> Callable[[], None]:
    """Offline when nothing needs the hub (so nothing tries the network or waits on it); quiet HF logs.

    Returns a function that puts the offline settings back as they were: a sweep runs cells in one process, and
    a local cell must not force a later hub cell offline."""
    saved_env = {name: os.environ.get(name) for name in _OFFLINE_VARS}
    saved_constants: list[tuple[Any, str, Any]] = []
    if all_sources_local(cfg):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        # huggingface_hub and datasets read the variables into constants at import (is_offline_mode() returns
        # huggingface_hub's), so setting the variables alone does nothing once they are imported.
        with contextlib.suppress(ImportError):
            import huggingface_hub.constants as hub_constants

            saved_constants.append((hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE))
            hub_constants.HF_HUB_OFFLINE = True
        with contextlib.suppress(ImportError):
            import datasets.config as datasets_config

            for name in _OFFLINE_VARS:
                saved_constants.append((datasets_config, name, getattr(datasets_config, name)))
                setattr(datasets_config, name, True)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # transformers 5's per-tensor 'Loading weights' bar
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    with contextlib.suppress(ImportError, AttributeError):
        import huggingface_hub.utils

        # Without a network its retries log a "Retrying in Ns" warning each; the failure itself is reported once,
        # with how to run from local files. Download progress bars (real use, with the hub) stay.
        huggingface_hub.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")

    def restore() -> None:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for module, name, value in reversed(saved_constants):
            setattr(module, name, value)

    return restore


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ClueAdvError("device: cuda was asked for but no CUDA device is available")
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def autocast_for(cfg: RunConfig, device: torch.device) -> tuple[str, Callable[[], Any]]:
    """The precision context, chosen once. bf16 needs no loss scaler (unlike fp16)."""
    bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not bf16:
        return "fp32", contextlib.nullcontext
    return "bf16", lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def pad_multiple_for(device: torch.device) -> int | None:
    """Batches are padded to their longest example, rounded up to a multiple of 8 on CUDA (tensor cores like
    it); on a CPU the rounding only adds work (14% padding instead of 2% on TNEWS)."""
    return 8 if device.type == "cuda" else None


def build_optimizer(model: torch.nn.Module, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW without weight decay on biases and LayerNorm weights. Fused into one kernel on cpu/cuda: the
    per-tensor loop was about a third of a tiny model's CPU step."""
    return torch.optim.AdamW(
        parameter_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
        fused=device.type in ("cpu", "cuda"),
    )


def _git_commit() -> str | None:
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


def _versions() -> dict[str, str]:
    import datasets
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "clue_adv": clue_adv.__version__,
    }


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # VmHWM (Linux) is the process's peak resident memory since the last reset (a sweep writes "5" to
    # /proc/self/clear_refs before each in-process run); ru_maxrss is the peak since the process started.
    peak = process_peak_rss_mb()
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def process_peak_rss_mb() -> float | None:
    """This process's peak resident memory since the last reset (VmHWM, MiB), or None where unreadable."""
    try:
        for line in Path("/proc/self/status").read_text(encoding="ascii", errors="replace").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        return None
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _save_model(model: torch.nn.Module, tokenizer: Any, directory: Path) -> None:
    """Replace directory/model atomically enough: write beside it, then swap by renames."""
    tmp, final, old = directory / ".model.tmp", directory / "model", directory / ".model.old"
    for stale in (tmp, old):
        if stale.is_symlink():  # planted: removed, never written through (rmtree refuses a link silently)
            stale.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def train(
    cfg: RunConfig,
    output_dir: str | Path | None = None,
    *,
    force: bool = False,
    show_progress: bool | None = None,
    console: Any = None,
) -> RunOutcome:
    """Run `cfg` to a completed, evaluated run directory (or return the completed one already there)."""
    if output_dir is not None:  # config.yaml records where the run really is (output_dir is not its identity)
        require_nameable(output_dir, "--output-dir")
        cfg = cfg.model_copy(update={"output_dir": str(output_dir)})
    directory = run_dir(cfg, output_dir).resolve()
    state = existing_state(cfg, directory)  # raises if the directory holds another config
    if state == "completed" and not force:
        from clue_adv.rundir import read_summary

        return RunOutcome(directory, read_summary(directory) or {}, skipped=True)

    restore_environment = configure_environment(cfg)
    if not all_sources_local(cfg) and os.environ.get("HF_HUB_OFFLINE", "").upper() not in ("1", "TRUE", "ON", "YES"):
        _hub_note(console)
    try:
        return _train(cfg, directory, show_progress, console)
    finally:
        restore_environment()
        release_run_lock(directory)  # the run is over (completed, failed or interrupted): the folder is free


_hub_note_shown = False


def _hub_note(console: Any) -> None:
    """Said once per process, before the hub is first tried: without a network its retries take about a minute
    before the error (which then says the same)."""
    global _hub_note_shown
    if _hub_note_shown:
        return
    _hub_note_shown = True
    from rich.console import Console

    (console or Console(stderr=True)).print(
        "note: model/data come from the Hugging Face hub (or its cache); without a network set HF_HUB_OFFLINE=1, "
        "or point model.name_or_path and data.path at local directories",
        highlight=False,
    )


def _check_paths(cfg: RunConfig) -> None:
    """The checks `clue-adv validate` makes, before minutes of tokenizing: a missing file fails at once."""
    from clue_adv.validate import check_paths

    problems = check_paths(cfg)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) with the files this config names:", problems)


def _setup_out_of_memory(cfg: RunConfig, directory: Path, device: torch.device) -> RunFailed:
    """Out of memory while moving the model or building the optimizer: record it as a failed run, with the same
    advice as an out-of-memory training step (nothing was written before, so the run directory starts here)."""
    start_run(cfg, directory)
    summary = {
        "status": "failed",
        "experiment": cfg.experiment,
        "task": cfg.task,
        "strategy": cfg.strategy.name,
        "strategy_tag": directory.parent.name,
        "seed": cfg.seed,
        "error": "out of memory",
        "failed_step": 0,
        "failed_during": "setup",
        "advice": OOM_ADVICE,
        "steps": 0,
        "peak_memory_mb": _peak_memory_mb(device),
        "finished_at": _now(),
    }
    atomic_write_json(directory / "summary.json", summary)
    return RunFailed(f"run failed: out of memory during setup: {OOM_ADVICE} ({directory})")


def _train(cfg: RunConfig, directory: Path, show_progress: bool | None, console: Any) -> RunOutcome:
    _check_paths(cfg)
    check_writable(directory)
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup, set_seed

    device = resolve_device(cfg)
    precision, autocast = autocast_for(cfg, device)
    strategy = build_strategy(cfg.strategy)

    # Setup, in dependency order; nothing is written until all of it succeeded.
    tokenizer = build_tokenizer(cfg.model)
    data = load_task_data(cfg, tokenizer)
    set_seed(cfg.seed)  # before the model is built: init must be the same for every strategy
    model = build_model(cfg, data.labels, strategy.needs_double_backward)
    check_vocab_size(tokenizer, model)
    try:
        model = model.to(device)
        strategy.setup(model)  # before compiling: SMART's teacher is a plain copy
        optimizer = build_optimizer(model, cfg, device)
        if cfg.model.compile:
            # In place (nn.Module.compile): the module, its parameters and save_pretrained stay as they are.
            model.compile(backend=cfg.model.compile_backend)
    except torch.OutOfMemoryError:
        raise _setup_out_of_memory(cfg, directory, device) from None
    pad_multiple = pad_multiple_for(device)
    loader = train_loader(data.train, tokenizer, cfg, pad_multiple)
    dev_loader = eval_loader(data.dev, tokenizer, cfg.eval.batch_size, pad_multiple)
    accum = cfg.optim.grad_accum_steps
    steps_per_epoch = math.ceil(len(loader) / accum)
    # A micro-batch weighs its share of its window's examples, so a window's gradient is that of the mean over its
    # examples however they are split: also an epoch's last window, shorter and ending in a smaller batch (every
    # batch but the epoch's last holds batch_size examples). Gradient penalties rely on it (StepContext).
    window_examples = accum * cfg.batch_size

    def window_size(micro: int) -> int:
        start = (micro - 1) // accum * window_examples
        return min(start + window_examples, len(data.train)) - start

    total_steps = steps_per_epoch * cfg.epochs
    warmup = round(cfg.optim.warmup_ratio * total_steps)
    scheduler = (
        get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
        if cfg.optim.schedule == "linear"
        else get_constant_schedule_with_warmup(optimizer, warmup)
    )
    special_ids = special_token_ids(tokenizer)

    start_run(cfg, directory)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # this run's peak, not an earlier run's in the same process
    summary: dict[str, Any] = {
        "status": "running",
        "experiment": cfg.experiment,
        "task": cfg.task,
        "strategy": cfg.strategy.name,
        "strategy_tag": directory.parent.name,
        "seed": cfg.seed,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "precision": precision,
        "attn_implementation": model.config._attn_implementation,
        "train_examples": len(data.train),
        "dev_examples": len(data.dev),
        "epochs": cfg.epochs,
        "steps_per_epoch": steps_per_epoch,
        "versions": _versions(),
        "git_commit": _git_commit(),
        "started_at": _now(),
    }
    atomic_write_json(directory / "summary.json", summary)
    metrics = JsonlWriter(directory / "metrics.jsonl")
    progress = RunProgress(
        f"{cfg.task}/{directory.parent.name}/seed-{cfg.seed}", total_steps, cfg.epochs, show_progress, console
    )
    counter = PassCounter()
    params = [p for p in model.parameters() if p.requires_grad]
    history: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    step_times: list[float] = []
    train_time = 0.0
    seen_examples = 0
    global_step = 0

    def run_eval(epoch: int) -> dict[str, Any]:
        nonlocal best
        result = evaluate(model, dev_loader, device, len(data.labels.ids), autocast)
        record = {"type": "eval", "epoch": epoch, "step": global_step, **result}
        metrics.write(record)
        history.append(record)
        if best is None or result["accuracy"] > best["accuracy"]:
            best = record
            if cfg.save_model:
                _save_model(model, tokenizer, directory)
        progress.evaluated(result["accuracy"])
        return record

    try:
        with progress:
            window: dict[str, list[float]] = {}
            model.train()
            for epoch in range(1, cfg.epochs + 1):
                progress.epoch(epoch)
                epoch_start = time.perf_counter()
                step_start = time.perf_counter()
                for micro, raw in enumerate(loader, start=1):
                    batch = Batch.from_mapping(raw, device)
                    ctx = StepContext(
                        model,
                        batch,
                        label_smoothing=cfg.label_smoothing,
                        loss_scale=batch.size / window_size(micro),
                        autocast=autocast,
                        counter=counter,
                        special_token_ids=special_ids,
                    )
                    result = strategy.training_step(ctx)
                    loss = float(result.loss)  # a CPU-GPU sync point, once per micro-batch
                    if not math.isfinite(loss):
                        raise NonFiniteError(global_step + 1, "loss")
                    window.setdefault("loss", []).append(loss)
                    for key, value in result.metrics.items():
                        window.setdefault(key, []).append(value)
                    seen_examples += batch.size
                    if micro % accum and micro != len(loader):
                        continue
                    max_norm = cfg.optim.max_grad_norm or float("inf")
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
                    if not math.isfinite(grad_norm):
                        raise NonFiniteError(global_step + 1, "gradient norm")
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    strategy.after_optimizer_step(model)
                    global_step += 1
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)  # honest step times
                    now = time.perf_counter()
                    step_times.append(now - step_start)
                    step_start = now
                    lr = scheduler.get_last_lr()[0]
                    progress.step(global_step, loss, lr)
                    if global_step % cfg.log_every_n_steps == 0:
                        record = {
                            "type": "train",
                            "epoch": epoch,
                            "step": global_step,
                            "lr": lr,
                            "grad_norm": grad_norm,
                            "step_time_s": step_times[-1],
                            **{k: sum(v) / len(v) for k, v in window.items() if v},
                        }
                        metrics.write(record)
                        progress.log(record)
                        window = {}
                    if cfg.eval.every_n_steps and global_step % cfg.eval.every_n_steps == 0:
                        train_time += time.perf_counter() - epoch_start
                        run_eval(epoch)
                        epoch_start = step_start = time.perf_counter()
                train_time += time.perf_counter() - epoch_start
                if not (cfg.eval.every_n_steps and global_step % cfg.eval.every_n_steps == 0):
                    run_eval(epoch)
                model.train()
    except NonFiniteError as e:
        summary.update(status="failed", error=str(e), failed_step=e.step, failed_quantity=e.quantity)
        raise RunFailed(f"run failed: {e} ({directory})") from None
    except torch.OutOfMemoryError:
        summary.update(
            status="failed",
            error="out of memory",
            failed_step=global_step + 1,
            advice=OOM_ADVICE,
        )
        raise RunFailed(f"run failed: out of memory at step {global_step + 1}: {OOM_ADVICE} ({directory})") from None
    except KeyboardInterrupt:
        summary.update(status="interrupted", interrupted_step=global_step)
        raise
    except BaseException as e:
        summary.update(status="failed", error=f"{type(e).__name__}: {e}", failed_step=global_step + 1)
        raise
    else:
        final = history[-1]
        summary.update(
            status="completed",
            best_dev_accuracy=best["accuracy"],
            best_dev_macro_f1=best["macro_f1"],
            best_epoch=best["epoch"],
            best_step=best["step"],
            final_dev_accuracy=final["accuracy"],
            final_dev_macro_f1=final["macro_f1"],
            dev_history=[{k: h[k] for k in ("epoch", "step", "accuracy", "macro_f1", "loss")} for h in history],
        )
    finally:
        metrics.close()
        if summary["status"] != "completed" and best is not None:
            # What the run reached before it stopped (also in metrics.jsonl), under names a completed run's
            # readers (the report) do not take for a finished result.
            summary.update(
                best_dev_accuracy_so_far=best["accuracy"],
                best_epoch_so_far=best["epoch"],
                dev_history=[{k: h[k] for k in ("epoch", "step", "accuracy", "macro_f1", "loss")} for h in history],
            )
        n = max(len(step_times) - 1, 1)  # the first step pays one-off costs (allocations, lazy init)
        micro_steps = max(math.ceil(seen_examples / cfg.batch_size), 1)
        summary.update(
            steps=global_step,
            train_wall_time_s=train_time,
            mean_step_time_s=sum(step_times[1:]) / n if len(step_times) > 1 else (step_times or [0.0])[0],
            samples_per_s=seen_examples / train_time if train_time > 0 else None,
            peak_memory_mb=_peak_memory_mb(device),
            passes_per_micro_step={
                "forward": counter.forward / micro_steps,
                "backward": counter.backward / micro_steps,
                "double_backward": counter.double_backward / micro_steps,
            },
            finished_at=_now(),
        )
        atomic_write_json(directory / "summary.json", summary)
    return RunOutcome(directory, summary)
