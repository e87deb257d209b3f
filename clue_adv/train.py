"""One training run, for every strategy, read top to bottom as a recipe:

    train()       the run directory decides: skip a completed run, or run this one
    setup()       paths → device → strategy → tokenizer → data → model → optimizer → loaders → scheduler,
                  in dependency order; nothing is written until all of it succeeded, so a bad path or label
                  fails without leaving anything behind
    resume        an unfinished run with a checkpoint (checkpoint.every_epoch) continues after its last epoch
    fit()         epochs of `train_step`s, evaluations at their points, checkpoints at epoch ends
    finish        summary.json from `build_summary`, however the run ended

`train_step` is one optimizer step: a window of micro-batches through the strategy (which leaves the
gradients), then clipping and the optimizer step. The loop never looks at the strategy's name.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.utils.data import DataLoader

import clue_adv
from clue_adv import checkpoint
from clue_adv.checks import check_paths
from clue_adv.config import RunConfig, require_nameable
from clue_adv.data import TaskData, eval_loader, load_task_data, train_loader
from clue_adv.errors import ClueAdvError, ConfigError, RunFailed
from clue_adv.evaluate import evaluate
from clue_adv.memory import peak_memory_mb
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
from clue_adv.regularizers.base import Batch, PassCounter, StepContext, Strategy
from clue_adv.rundir import (
    JsonlWriter,
    acquire_run_lock,
    atomic_write_json,
    check_writable,
    existing_state,
    read_summary,
    release_run_lock,
    remove_checkpoint,
    replace_directory,
    resume_run,
    run_dir,
    start_run,
    summary_header,
    utc_now,
)
from clue_adv.trackers import RunLog


class NonFiniteError(Exception):
    """A non-finite loss or gradient norm in `train_step`; the loop knows (and reports) the step."""

    def __init__(self, quantity: str) -> None:
        super().__init__(f"non-finite {quantity}")
        self.quantity = quantity


@dataclass
class RunOutcome:
    directory: Path
    summary: dict[str, Any]
    skipped: bool = False


@dataclass
class Learner:
    """What one optimizer step touches. `scheduler` None keeps the learning rate (the strategy benchmark)."""

    model: torch.nn.Module
    strategy: Strategy
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    autocast: Callable[[], Any] = contextlib.nullcontext
    label_smoothing: float = 0.0
    max_grad_norm: float | None = None
    special_token_ids: tuple[int, ...] = ()
    counter: PassCounter = field(default_factory=PassCounter)

    def __post_init__(self) -> None:
        self.params = [p for p in self.model.parameters() if p.requires_grad]


@dataclass
class StepOutput:
    """What `train_step` reports: each micro-batch's clean task loss and strategy metrics, the window's mean
    clean loss over its examples, the gradient norm before clipping, and the window's example count."""

    losses: list[float]
    metrics: dict[str, list[torch.Tensor | float]]  # as StepResult's: device tensors, read when logged
    loss: float
    grad_norm: float
    examples: int


@dataclass
class Run:
    """Everything `setup` built for one run."""

    cfg: RunConfig
    directory: Path
    device: torch.device
    data: TaskData
    tokenizer: Any
    learner: Learner
    loader: DataLoader
    dev_loader: DataLoader
    steps_per_epoch: int
    facts: dict[str, Any]  # summary.json's description of the run (device, precision, sizes, versions)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs


@dataclass
class LoopState:
    """Where the loop is: everything `fit` changes besides the model, optimizer and scheduler."""

    started_at: str = field(default_factory=utc_now)
    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken
    examples: int = 0  # training examples seen
    history: list[dict[str, Any]] = field(default_factory=list)  # the eval records, in order
    best: dict[str, Any] | None = None  # the eval record with the best dev accuracy so far
    log_window: dict[str, list[torch.Tensor | float]] = field(default_factory=dict)  # per micro-batch, since last log
    last_step: dict[str, float] = field(default_factory=dict)  # the latest step's lr, grad_norm and time
    epoch_loss_sum: float = 0.0  # this epoch's clean loss summed over its examples: the final training loss
    epoch_examples: int = 0
    resumed_from: list[int] = field(default_factory=list)  # the epochs this run was resumed after
    # eval.early_stopping: the accuracy to beat (by min_delta) and the evaluations since it was set
    reference_accuracy: float | None = None
    evals_without_improvement: int = 0
    stopped_early_at: tuple[int, int] | None = None  # (epoch, step)
    train_time_s: float = 0.0  # training only: evaluation and checkpoints excluded
    timed_steps: int = 0
    first_step_s: float = 0.0
    later_steps_s: float = 0.0

    def stepped(self, out: StepOutput, seconds: float, lr: float) -> None:
        """Book one optimizer step that took `seconds` and left the learning rate at `lr`."""
        self.step += 1
        self.examples += out.examples
        self.epoch_loss_sum += out.loss * out.examples
        self.epoch_examples += out.examples
        for key, values in {"loss": out.losses, **out.metrics}.items():
            self.log_window.setdefault(key, []).extend(values)
        self.last_step = {"lr": lr, "grad_norm": out.grad_norm, "step_time_s": seconds}
        if self.timed_steps == 0:
            self.first_step_s = seconds
        else:
            self.later_steps_s += seconds
        self.timed_steps += 1

    @property
    def mean_step_time_s(self) -> float:
        # the first step pays one-off costs (allocations, lazy init)
        return self.later_steps_s / (self.timed_steps - 1) if self.timed_steps > 1 else self.first_step_s


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
        return RunOutcome(directory, read_summary(directory) or {}, skipped=True)

    restore_environment = configure_environment(cfg)
    note_hub_use(cfg, console)
    try:
        return _train(cfg, directory, show_progress, console, force)
    finally:
        restore_environment()
        release_run_lock(directory)  # the run is over (completed, failed or interrupted): the folder is free


def _train(cfg: RunConfig, directory: Path, show_progress: bool | None, console: Any, force: bool) -> RunOutcome:
    """setup → resume or start the run files → fit → summary."""
    run = setup(cfg, directory)
    state = None if force else _resume(run, console)
    if state is None:
        state = LoopState()
        start_run(cfg, directory)
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)  # this run's peak, not an earlier run's in the same process
    # metrics.jsonl and the trackers; opened before the summary says `running`, as a tracker may fail to start
    metrics = RunLog(cfg, directory, resumed_at_step=state.step if state.resumed_from else None)
    atomic_write_json(directory / "summary.json", build_summary(run, state, {"status": "running"}))
    name = f"{cfg.task}/{directory.parent.name}/seed-{cfg.seed}"
    progress = RunProgress(name, run.total_steps, cfg.epochs, show_progress, console)
    ending: dict[str, Any] = {"status": "completed"}
    try:
        with progress:
            fit(run, state, metrics, progress)
    except BaseException as e:
        ending, instead = _ending(e, state.step, directory)
        if instead is None:
            raise
        raise instead from None
    finally:
        metrics.close(ending["status"])
        summary = build_summary(run, state, ending)
        atomic_write_json(directory / "summary.json", summary)
    remove_checkpoint(directory)  # completed: never resumed from again, and it is about 3x the model's size
    return RunOutcome(directory, summary)


def setup(cfg: RunConfig, directory: Path) -> Run:
    """Build everything the run needs, in dependency order. Writes nothing, except a failed run's summary when
    the model or optimizer does not fit in memory."""
    _check_paths(cfg)
    check_writable(directory)
    from transformers import set_seed

    device = resolve_device(cfg)
    precision, autocast = autocast_for(cfg, device)
    strategy = build_strategy(cfg.strategy)
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
    steps_per_epoch = math.ceil(len(loader) / cfg.optim.grad_accum_steps)  # as accumulation_windows cuts them
    learner = Learner(
        model,
        strategy,
        optimizer,
        build_scheduler(optimizer, cfg, steps_per_epoch * cfg.epochs),
        autocast,
        label_smoothing=cfg.label_smoothing,
        max_grad_norm=cfg.optim.max_grad_norm,
        special_token_ids=special_token_ids(tokenizer),
    )
    facts = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "precision": precision,
        "attn_implementation": model.config._attn_implementation,
        "train_examples": len(data.train),
        "dev_examples": len(data.dev),
        "epochs": cfg.epochs,
        "steps_per_epoch": steps_per_epoch,
        "versions": library_versions(),
        "git_commit": git_commit(),
    }
    return Run(cfg, directory, device, data, tokenizer, learner, loader, dev_loader, steps_per_epoch, facts)


def fit(run: Run, state: LoopState, metrics: JsonlWriter, progress: RunProgress) -> None:
    """Train from `state` to the last epoch: `train_step` per accumulation window, a log line every
    `log_every_n_steps`, an evaluation every `eval.every_n_steps` and at each epoch's end."""
    cfg, learner = run.cfg, run.learner
    learner.model.train()
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        progress.epoch(epoch)
        state.epoch_loss_sum, state.epoch_examples = 0.0, 0
        clock = step_start = time.perf_counter()
        for window in accumulation_windows(run.loader, cfg.optim.grad_accum_steps):
            out = train_step(learner, [Batch.from_mapping(raw, run.device) for raw in window])
            if run.device.type == "cuda":
                torch.cuda.synchronize(run.device)  # honest step times
            now = time.perf_counter()
            state.stepped(out, now - step_start, learner.optimizer.param_groups[0]["lr"])
            step_start = now
            progress.step(state.step, out.losses[-1], state.last_step["lr"])
            if state.step % cfg.log_every_n_steps == 0:
                _log(state, epoch, metrics, progress)
            if cfg.eval.every_n_steps and state.step % cfg.eval.every_n_steps == 0:
                state.train_time_s += time.perf_counter() - clock
                _evaluate(run, state, epoch, metrics, progress)
                clock = step_start = time.perf_counter()
                if state.stopped_early_at:
                    break
        state.train_time_s += time.perf_counter() - clock
        if not state.history or state.history[-1]["step"] != state.step:  # unless this step was just evaluated
            _evaluate(run, state, epoch, metrics, progress)
        state.epoch = epoch
        if state.stopped_early_at:
            _say(
                progress.console,
                f"stopping early at epoch {epoch}, step {state.step}: dev accuracy has not "
                f"improved in {state.evals_without_improvement} evaluation(s)",
            )
            break
        if cfg.checkpoint.every_epoch:
            _save_checkpoint(run, state, metrics)
    if state.log_window:  # the last, partial logging window: a short run logs its training loss too
        _log(state, state.epoch, metrics, progress)


def train_step(learner: Learner, window: list[Batch], on_gradients: Callable[[], None] | None = None) -> StepOutput:
    """One optimizer step on one accumulation window: each micro-batch through the strategy, its gradients
    weighted by its share of the window's examples, so the step follows the mean loss over the window's examples
    whatever the micro-batch sizes (an epoch's short last window, a short last micro-batch; gradient penalties rely
    on it, see StepContext.loss_scale); then clipping, the optimizer and scheduler steps. `on_gradients` is called
    once the gradients are in, before clipping (the benchmark times the strategy's part there)."""
    examples = sum(batch.size for batch in window)
    losses: list[float] = []
    loss_sum = 0.0
    metrics: dict[str, list[torch.Tensor | float]] = {}
    for batch in window:
        ctx = StepContext(
            learner.model,
            batch,
            label_smoothing=learner.label_smoothing,
            loss_scale=batch.size / examples,
            autocast=learner.autocast,
            counter=learner.counter,
            special_token_ids=learner.special_token_ids,
        )
        result = learner.strategy.training_step(ctx)
        loss = float(result.loss)  # a CPU-GPU sync point, once per micro-batch
        if not math.isfinite(loss):
            raise NonFiniteError("loss")
        losses.append(loss)
        loss_sum += loss * batch.size
        for key, value in result.metrics.items():
            metrics.setdefault(key, []).append(value)
    if on_gradients is not None:
        on_gradients()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(learner.params, learner.max_grad_norm or math.inf))
    if not math.isfinite(grad_norm):
        raise NonFiniteError("gradient norm")
    learner.optimizer.step()
    if learner.scheduler is not None:
        learner.scheduler.step()
    learner.optimizer.zero_grad(set_to_none=True)
    learner.strategy.after_optimizer_step(learner.model)
    return StepOutput(losses, metrics, loss_sum / examples, grad_norm, examples)


T = TypeVar("T")


def accumulation_windows(micro_batches: Iterable[T], size: int) -> Iterator[list[T]]:
    """The epoch's micro-batches, `size` per optimizer step; the epoch's last window may hold fewer."""
    window: list[T] = []
    for micro_batch in micro_batches:
        window.append(micro_batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def _log(state: LoopState, epoch: int, metrics: JsonlWriter, progress: RunProgress) -> None:
    """A train line: the last step's lr, gradient norm and time, and the micro-batch means since the last line."""
    record = {
        "type": "train",
        "epoch": epoch,
        "step": state.step,
        **state.last_step,
        # strategies' metrics are device tensors (StepResult): read here, once per line, not per micro-batch
        **{k: float(sum(v) / len(v)) for k, v in state.log_window.items() if v},
    }
    metrics.write(record)
    progress.log(record)
    state.log_window = {}


def _evaluate(run: Run, state: LoopState, epoch: int, metrics: JsonlWriter, progress: RunProgress) -> None:
    learner = run.learner
    result = evaluate(learner.model, run.dev_loader, run.device, len(run.data.labels.ids), learner.autocast)
    record = {"type": "eval", "epoch": epoch, "step": state.step, **result}
    metrics.write(record)
    state.history.append(record)
    if state.best is None or result["accuracy"] > state.best["accuracy"]:
        state.best = record
        if run.cfg.save_model:
            _save_model(learner.model, run.tokenizer, run.directory)
    progress.evaluated(result["accuracy"])
    stopping = run.cfg.eval.early_stopping
    if stopping is not None:
        reference = state.reference_accuracy
        if reference is None or result["accuracy"] > reference + stopping.min_delta:
            state.reference_accuracy, state.evals_without_improvement = result["accuracy"], 0
        else:
            state.evals_without_improvement += 1
            if state.evals_without_improvement >= stopping.patience:
                state.stopped_early_at = (epoch, state.step)


def _save_checkpoint(run: Run, state: LoopState, metrics: JsonlWriter) -> None:
    # the window's device-tensor metrics as numbers: the loop state is written as JSON
    state.log_window = {k: [float(x) for x in v] for k, v in state.log_window.items()}
    loop = {"state": asdict(state), "passes": asdict(run.learner.counter), "metrics_bytes": metrics.size()}
    checkpoint.save(run.directory, state.epoch, _resumable(run), loop | _data_shape(run))


def _resume(run: Run, console: Any) -> LoopState | None:
    """The loop state of the run's last checkpoint, with the model, optimizer, scheduler, strategy and RNGs put
    back as they were then; None when there is no usable checkpoint (the run starts over)."""
    path = checkpoint.latest(run.directory)
    if path is None:
        return None
    acquire_run_lock(run.directory)  # before reading: no other process may be writing there
    try:
        loop, tensors = checkpoint.read(path, _data_shape(run))
        state = LoopState(**loop["state"])
        passes = PassCounter(**loop["passes"])
        metrics_bytes = loop["metrics_bytes"]
        if (run.directory / "metrics.jsonl").stat().st_size < metrics_bytes:
            raise checkpoint.Unusable("metrics.jsonl is shorter than when the checkpoint was written")
    except (checkpoint.Unusable, OSError, KeyError, TypeError) as e:
        _say(console, f"{run.directory}: not resuming from {path.name} ({e}); starting over")
        return None
    try:
        checkpoint.restore(path, _resumable(run), loop, tensors)
    except Exception as e:  # read fine but does not fit the model built from the same config: not silently redone
        raise ClueAdvError(
            f"{path} does not fit this run ({type(e).__name__}: {e}); rerun with --force to start over"
        ) from None
    run.learner.counter = passes
    resume_run(run.cfg, run.directory, metrics_bytes)
    state.resumed_from.append(state.epoch)
    _say(console, f"{run.directory}: resuming after epoch {state.epoch} (step {state.step}) from its checkpoint")
    return state


def _resumable(run: Run) -> checkpoint.Resumable:
    learner = run.learner
    # Both training samplers (random, length-grouped) draw every epoch's order from this one seeded generator.
    generator = run.loader.sampler.generator
    return checkpoint.Resumable(learner.model, learner.optimizer, learner.scheduler, learner.strategy, generator)


def _data_shape(run: Run) -> dict[str, Any]:
    """What a checkpoint must agree on with the run resuming it: the same config can name changed data files."""
    return {
        "train_examples": len(run.data.train),
        "dev_examples": len(run.data.dev),
        "steps_per_epoch": run.steps_per_epoch,
        "data_fingerprint": [getattr(ds, "_fingerprint", None) for ds in (run.data.train, run.data.dev)],
    }


def _say(console: Any, message: str) -> None:
    from rich.console import Console

    (console or Console(stderr=True)).print(message, highlight=False, markup=False, soft_wrap=True)


def build_summary(run: Run, state: LoopState, ending: dict[str, Any]) -> dict[str, Any]:
    """summary.json: which run, what it ran on, how it ended (`ending`: status and its details), its results and
    its costs. Results of a run that did not complete carry `_so_far` names, which the report does not take for a
    finished result."""
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
        mean_step_time_s=state.mean_step_time_s,
        samples_per_s=state.examples / state.train_time_s if state.train_time_s > 0 else None,
        peak_memory_mb=peak_memory_mb(run.device),
        passes_per_micro_step={
            "forward": counter.forward / micro_steps,
            "backward": counter.backward / micro_steps,
            "double_backward": counter.double_backward / micro_steps,
        },
        finished_at=utc_now(),
    )
    return summary


def _ending(e: BaseException, steps_done: int, directory: Path) -> tuple[dict[str, Any], BaseException | None]:
    """How exception `e` ends the run: the summary's status and details, and what to raise instead (None: `e`)."""
    step = steps_done + 1  # the step that was running
    if isinstance(e, NonFiniteError):
        error = f"non-finite {e.quantity} at step {step}"
        fields = {"status": "failed", "error": error, "failed_step": step, "failed_quantity": e.quantity}
        return fields, RunFailed(f"run failed: {error} ({directory})")
    if isinstance(e, torch.OutOfMemoryError):
        fields = {"status": "failed", "error": "out of memory", "failed_step": step, "advice": OOM_ADVICE}
        return fields, RunFailed(f"run failed: out of memory at step {step}: {OOM_ADVICE} ({directory})")
    if isinstance(e, KeyboardInterrupt):
        return {"status": "interrupted", "interrupted_step": steps_done}, None
    return {"status": "failed", "error": f"{type(e).__name__}: {e}", "failed_step": step}, None


def _check_paths(cfg: RunConfig) -> None:
    """The checks `clue-adv validate` makes, before minutes of tokenizing: a missing file fails at once."""
    problems = check_paths(cfg)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) with the files this config names:", problems)


def _setup_out_of_memory(cfg: RunConfig, directory: Path, device: torch.device) -> RunFailed:
    """Out of memory while moving the model or building the optimizer: record it as a failed run, with the same
    advice as an out-of-memory training step (nothing was written before, so the run directory starts here)."""
    start_run(cfg, directory)
    summary = {
        **summary_header(cfg, directory, "failed"),
        "error": "out of memory",
        "failed_step": 0,
        "failed_during": "setup",
        "advice": OOM_ADVICE,
        "steps": 0,
        "peak_memory_mb": peak_memory_mb(device),
        "finished_at": utc_now(),
    }
    atomic_write_json(directory / "summary.json", summary)
    return RunFailed(f"run failed: out of memory during setup: {OOM_ADVICE} ({directory})")


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
    return None


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: RunConfig, total_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

    warmup = round(cfg.optim.warmup_ratio * total_steps)
    if cfg.optim.schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def _save_model(model: torch.nn.Module, tokenizer: Any, directory: Path) -> None:
    """Replace directory/model atomically enough: write beside it, then swap by renames."""

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    replace_directory(directory / "model", fill)


def note_hub_use(cfg: Any, console: Any) -> None:
    """When a config (a run or pretrain config) reads from the hub and the hub is not switched off, say once, before
    trying, how to run offline."""
    if not all_sources_local(cfg) and os.environ.get("HF_HUB_OFFLINE", "").upper() not in ("1", "TRUE", "ON", "YES"):
        _hub_note(console)


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
