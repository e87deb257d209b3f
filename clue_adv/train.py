"""One training run, for every strategy, read top to bottom as a recipe:

    train()       the run directory decides: skip a completed run, or run this one
    setup()       paths → device → strategy → tokenizer → data → model → optimizer → loaders → scheduler,
                  in dependency order; nothing is written until all of it succeeded, so a bad path or label
                  fails without leaving anything behind
    resume        an unfinished run with a checkpoint (checkpoint.every_epoch) continues after its last epoch
    fit()         epochs of `train_step`s, evaluations (and every_eval diagnostics) at their points, checkpoints
                  at epoch ends
    diagnostics   with `diagnostics.when: end`, the best and the final model measured (run_diagnostics.py)
    finish        summary.json from `summary.build_summary`, however the run ended

`train_step` is one optimizer step: a window of micro-batches through the strategy (which leaves the
gradients), then clipping and the optimizer step. The loop never looks at the strategy's name.

What the run runs on (the hub's offline switches, quiet logs, deterministic kernels, the device, precision and
padding) is chosen in runenv.py, which pretraining shares; the types the run is made of are in runstate.py.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from clue_adv import checkpoint
from clue_adv.checks import check_paths
from clue_adv.config import RunConfig, require_nameable
from clue_adv.data import eval_loader, load_task_data, loader_options, train_loader
from clue_adv.errors import ConfigError, RunFailed
from clue_adv.evaluate import evaluate
from clue_adv.model import (
    build_model,
    build_tokenizer,
    check_vocab_size,
    parameter_groups,
    special_token_ids,
)
from clue_adv.progress import RunProgress
from clue_adv.regularizers import build_strategy
from clue_adv.regularizers.base import Batch, StepContext
from clue_adv.run_diagnostics import RunDiagnostics
from clue_adv.rundir import (
    JsonlWriter,
    atomic_write_json,
    check_writable,
    existing_state,
    read_summary,
    release_run_lock,
    remove_checkpoint,
    replace_directory,
    run_dir,
    start_run,
)
from clue_adv.runenv import (
    all_sources_local,  # noqa: F401 (imported from here by the tests)
    autocast_for,
    configure_environment,
    deterministic_mode,
    host_facts,
    note_hub_use,
    pad_multiple_for,
    resolve_device,
)
from clue_adv.runstate import (
    FINITE,
    NONFINITE_GRADIENT,
    NONFINITE_LOSS,
    Learner,
    LoopState,
    Run,
    RunOutcome,
    StepOutput,
    UnreadSteps,
)
from clue_adv.summary import (
    OOM_ADVICE,
    build_summary,
    ending_of,
    git_commit,
    library_versions,
    setup_out_of_memory_summary,
)
from clue_adv.trackers import RunLog


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
    # raises if the directory holds another config that trained, unless --force replaces it
    state = existing_state(cfg, directory, force=force)
    if state == "completed" and not force:
        return RunOutcome(directory, read_summary(directory) or {}, skipped=True)

    restore_environment = configure_environment(cfg)
    restore_determinism = deterministic_mode(cfg.deterministic)
    note_hub_use(cfg, console)
    try:
        return _train(cfg, directory, show_progress, console, force)
    finally:
        restore_determinism()
        restore_environment()
        release_run_lock(directory)  # the run is over (completed, failed or interrupted): the folder is free


def _train(cfg: RunConfig, directory: Path, show_progress: bool | None, console: Any, force: bool) -> RunOutcome:
    """setup → resume or start the run files → fit → end-of-run diagnostics → summary."""
    run = setup(cfg, directory)
    state = None if force else checkpoint.resume(run, lambda message: _say(console, message))
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
            if run.diagnostics is not None:  # `when: end`: the best and the final model, now that both exist
                _record(metrics, *run.diagnostics.finished(run.learner.model, state.best, state.history[-1]))
    except BaseException as e:
        ending, instead = ending_of(e, state.step, directory)
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
    pad_multiple, feeding = pad_multiple_for(device), loader_options(device)
    if feeding.get("num_workers"):  # forked after tokenizing in parallel, each loader worker would warn of it
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # (put back by configure_environment's restore)
    loader = train_loader(data.train, tokenizer, cfg, pad_multiple, **feeding)
    dev_loader = eval_loader(data.dev, tokenizer, cfg.eval.batch_size, pad_multiple, **feeding)
    steps_per_epoch = math.ceil(len(loader) / cfg.optim.grad_accum_steps)  # as accumulation_windows cuts them
    diagnostics = RunDiagnostics.build(cfg.diagnostics, cfg.seed, data.dev, data.train, tokenizer, pad_multiple)
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
        "host": host_facts(),
    }
    return Run(
        cfg, directory, device, data, tokenizer, learner, loader, dev_loader, steps_per_epoch, facts, diagnostics
    )


def fit(run: Run, state: LoopState, metrics: JsonlWriter, progress: RunProgress) -> None:
    """Train from `state` to the last epoch: `train_step` per accumulation window, a log line every
    `log_every_n_steps`, an evaluation every `eval.every_n_steps` and at each epoch's end. The steps' losses, gradient
    norms and metrics stay on the device until one of those (or the run's first step, timed alone) reads them."""
    cfg, learner = run.cfg, run.learner
    learner.model.train()
    latest_loss: float | None = None  # the progress bar's: the last micro-batch's loss when the steps were last read
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        progress.epoch(epoch)
        state.epoch_loss_sum, state.epoch_examples = 0.0, 0
        clock = time.perf_counter()
        unread = UnreadSteps()
        for window in accumulation_windows(run.loader, cfg.optim.grad_accum_steps):
            out = train_step(learner, [Batch.from_mapping(raw, run.device) for raw in window])
            unread.add(out)
            state.stepped(out, learner.optimizer.param_groups[0]["lr"])
            logging = state.step % cfg.log_every_n_steps == 0
            evaluating = bool(cfg.eval.every_n_steps) and state.step % cfg.eval.every_n_steps == 0
            if logging or evaluating or state.timed_steps == 0:
                latest_loss = _read(state, unread)  # raises NonFiniteError naming the exact step
            progress.step(state.step, latest_loss, state.last_step["lr"])
            if logging:
                _log(state, epoch, metrics, progress)
            if evaluating:
                state.train_time_s += time.perf_counter() - clock
                _evaluate(run, state, epoch, metrics, progress)
                clock = time.perf_counter()
                unread.restart_clock()
                if state.stopped_early_at:
                    break
        if unread:  # the epoch's last steps, before its evaluation and checkpoint
            latest_loss = _read(state, unread)
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
            checkpoint.save_run(run, state, metrics.size())
    if state.log_window:  # the last, partial logging window: a short run logs its training loss too
        _log(state, state.epoch, metrics, progress)


def train_step(learner: Learner, window: list[Batch], on_gradients: Callable[[], None] | None = None) -> StepOutput:
    """One optimizer step on one accumulation window: each micro-batch through the strategy, its gradients
    weighted by its share of the window's examples, so the step follows the mean loss over the window's examples
    whatever the micro-batch sizes (an epoch's short last window, a short last micro-batch; gradient penalties rely
    on it, see StepContext.loss_scale); then clipping, the optimizer and scheduler steps. `on_gradients` is called
    once the gradients are in, before clipping (the benchmark times the strategy's part there).

    Nothing is read on the host: a non-finite loss or gradient norm skips the update on the device and is reported
    in the StepOutput, which the loop reads later (UnreadSteps)."""
    examples = sum(batch.size for batch in window)
    losses: list[torch.Tensor] = []
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
        losses.append(result.loss.detach())
        for key, value in result.metrics.items():
            metrics.setdefault(key, []).append(value)
    if on_gradients is not None:
        on_gradients()
    device = losses[0].device
    # on the device where there are gradients (a CPU zero where none are)
    grad_norm = torch.nn.utils.clip_grad_norm_(learner.params, learner.max_grad_norm or math.inf).to(device)
    # a non-finite loss leaves non-finite gradients too: the loss is named, as the cause
    loss_finite = torch.stack([loss.float() for loss in losses]).isfinite().all()
    nonfinite = torch.where(loss_finite, torch.where(grad_norm.isfinite(), FINITE, NONFINITE_GRADIENT), NONFINITE_LOSS)
    _step_unless(learner.optimizer, nonfinite != FINITE)
    if learner.scheduler is not None:
        learner.scheduler.step()
    learner.optimizer.zero_grad(set_to_none=True)
    learner.strategy.after_optimizer_step(learner.model)
    return StepOutput(losses, metrics, grad_norm.detach(), nonfinite, [batch.size for batch in window])


def _step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """The optimizer's step, skipped where the device flag `skip` is set. The fused optimizers (build_optimizer's)
    take the flag as GradScaler hands them its `found_inf` and skip on the device, weights, moments and step count
    alike; any other optimizer needs it on the host, a sync per step."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.found_inf = skip.float()  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
    elif not skip.item():  # a CPU-GPU sync point
        optimizer.step()


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


def _read(state: LoopState, unread: UnreadSteps) -> float:
    """Read the unread steps' device values (one host read) into `state`; the latest micro-batch loss, for the bar."""
    steps, seconds = unread.read()
    state.read(steps, seconds)
    return steps[-1].losses[-1]


def _log(state: LoopState, epoch: int, metrics: JsonlWriter, progress: RunProgress) -> None:
    """A train line: the last step's lr and gradient norm, the mean step time of the steps read with it, and the
    micro-batch means since the last line."""
    record = {
        "type": "train",
        "epoch": epoch,
        "step": state.step,
        **state.last_step,
        **{k: sum(v) / len(v) for k, v in state.log_window.items() if v},
    }
    _record(metrics, record)
    progress.log(record)
    state.log_window = {}


def _evaluate(run: Run, state: LoopState, epoch: int, metrics: JsonlWriter, progress: RunProgress) -> None:
    learner = run.learner
    clock = time.perf_counter()
    result = evaluate(learner.model, run.dev_loader, run.device, len(run.data.labels.ids), learner.autocast)
    record = {"type": "eval", "epoch": epoch, "step": state.step, **result}
    _record(metrics, record)
    state.history.append(record)
    is_best = state.best is None or result["accuracy"] > state.best["accuracy"]
    if is_best:
        state.best = record
        if run.cfg.save_model:
            _save_model(learner.model, run.tokenizer, run.directory)
    state.eval_time_s += time.perf_counter() - clock  # the diagnostics below keep their own time
    if run.diagnostics is not None:  # `when: every_eval` measures now; `when: end` keeps the best weights
        _record(metrics, *run.diagnostics.evaluated(learner.model, record, is_best))
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


def _record(metrics: JsonlWriter, *records: dict[str, Any]) -> None:
    """Every metrics.jsonl line (train, eval, diagnostics) is written here."""
    for record in records:
        metrics.write(record)


def _say(console: Any, message: str) -> None:
    from rich.console import Console

    (console or Console(stderr=True)).print(message, highlight=False, markup=False, soft_wrap=True)


def _check_paths(cfg: RunConfig) -> None:
    """The checks `clue-adv validate` makes, before minutes of tokenizing: a missing file fails at once."""
    problems = check_paths(cfg)
    if problems:
        raise ConfigError(f"{len(problems)} problem(s) with the files this config names:", problems)


def _setup_out_of_memory(cfg: RunConfig, directory: Path, device: torch.device) -> RunFailed:
    """Out of memory while moving the model or building the optimizer: record it as a failed run, with the same
    advice as an out-of-memory training step (nothing was written before, so the run directory starts here)."""
    start_run(cfg, directory)
    atomic_write_json(directory / "summary.json", setup_out_of_memory_summary(cfg, directory, device))
    return RunFailed(f"run failed: out of memory during setup: {OOM_ADVICE} ({directory})")


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
