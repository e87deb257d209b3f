"""What a training run is made of and where it stands: the types `train` builds and changes, and that the
checkpoint (`checkpoint.py`) and the summary (`summary.py`) read, kept apart from the recipe so that those
modules need not import it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from clue_adv.config import RunConfig
from clue_adv.data import TaskData
from clue_adv.regularizers.base import PassCounter, Strategy
from clue_adv.run_diagnostics import RunDiagnostics
from clue_adv.rundir import utc_now


class NonFiniteError(Exception):
    """A non-finite loss or gradient norm at optimizer step `step` (counted from 1), found when the loop read the
    step's values; `train_step` skipped that step's update on the device."""

    def __init__(self, step: int, quantity: str) -> None:
        super().__init__(f"non-finite {quantity} at step {step}")
        self.step = step
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


# StepOutput.nonfinite: what made a step non-finite, and so skipped (the first found, in this order)
FINITE, NONFINITE_LOSS, NONFINITE_GRADIENT = 0, 1, 2
NONFINITE_QUANTITY = {NONFINITE_LOSS: "loss", NONFINITE_GRADIENT: "gradient norm"}


@dataclass
class StepOutput:
    """What `train_step` leaves for the loop to read later, on the device: each micro-batch's clean task loss and
    strategy metrics, the gradient norm before clipping, and `nonfinite` (FINITE, NONFINITE_LOSS or
    NONFINITE_GRADIENT; a non-finite step's update was skipped). On the host: each micro-batch's example count."""

    losses: list[torch.Tensor]
    metrics: dict[str, list[torch.Tensor | float]]  # as StepResult's: device tensors, or nan for "not applicable"
    grad_norm: torch.Tensor
    nonfinite: torch.Tensor
    sizes: list[int]

    @property
    def examples(self) -> int:
        return sum(self.sizes)


@dataclass
class ReadStep:
    """A StepOutput read on the host."""

    losses: list[float]
    metrics: dict[str, list[float]]
    grad_norm: float
    nonfinite: int
    sizes: list[int]

    @property
    def examples(self) -> int:
        return sum(self.sizes)

    @property
    def loss(self) -> float:
        """The step's mean clean loss over its examples (each micro-batch weighs its share of them)."""
        return sum(loss * size for loss, size in zip(self.losses, self.sizes, strict=True)) / self.examples


class UnreadSteps:
    """The optimizer steps whose device values the loop has not read yet, and when the first of them started.

    On a GPU every read of a device value (`float(t)`, `t.item()`, `bool(t)`) stops the host until the device has
    done all queued work, so the loop reads its steps together, in one host read: once per logging window, and
    before an evaluation or a checkpoint, which need the window's losses (and to know that it was finite)."""

    def __init__(self) -> None:
        self.outputs: list[StepOutput] = []
        self.started = time.perf_counter()

    def __len__(self) -> int:
        return len(self.outputs)

    def add(self, out: StepOutput) -> None:
        self.outputs.append(out)

    def read(self) -> tuple[list[ReadStep], float]:
        """The steps' values (one host read for all of them) and the seconds since the first step started, until
        the device finished the last (the read waits for it); afterwards nothing is unread and the clock restarts."""
        tensors = [
            value
            for out in self.outputs
            for value in (*out.losses, out.grad_norm, out.nonfinite, *(v for vs in out.metrics.values() for v in vs))
            if isinstance(value, torch.Tensor)
        ]
        # float64: every float32/bf16 value exactly as float() would read it alone
        values = iter(torch.stack([t.detach().reshape(()).double() for t in tensors]).tolist() if tensors else [])

        def number(value: torch.Tensor | float) -> float:
            return next(values) if isinstance(value, torch.Tensor) else float(value)

        steps = []
        for out in self.outputs:  # the order the values were stacked in
            losses = [number(v) for v in out.losses]
            grad_norm, nonfinite = number(out.grad_norm), int(number(out.nonfinite))
            metrics = {key: [number(v) for v in vs] for key, vs in out.metrics.items()}
            steps.append(ReadStep(losses, metrics, grad_norm, nonfinite, out.sizes))
        now = time.perf_counter()
        seconds, self.outputs, self.started = now - self.started, [], now
        return steps, seconds

    def restart_clock(self) -> None:
        """Time from now on (evaluations and checkpoints are not steps)."""
        self.started = time.perf_counter()


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
    diagnostics: RunDiagnostics | None = None  # None: diagnostics.enabled is off

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
    log_window: dict[str, list[float]] = field(default_factory=dict)  # per micro-batch, read since the last log line
    last_step: dict[str, float] = field(default_factory=dict)  # the latest step's lr and grad_norm, the mean step time
    epoch_loss_sum: float = 0.0  # this epoch's clean loss summed over its examples: the final training loss
    epoch_examples: int = 0
    resumed_from: list[int] = field(default_factory=list)  # the epochs this run was resumed after
    # eval.early_stopping: the accuracy to beat (by min_delta) and the evaluations since it was set
    reference_accuracy: float | None = None
    evals_without_improvement: int = 0
    stopped_early_at: tuple[int, int] | None = None  # (epoch, step)
    train_time_s: float = 0.0  # training only: evaluation, diagnostics and checkpoints excluded
    eval_time_s: float = 0.0  # dev evaluations and saving the best model (a run's cost beside its training)
    timed_steps: int = 0
    first_step_s: float = 0.0
    later_steps_s: float = 0.0

    def stepped(self, out: StepOutput, lr: float) -> None:
        """Count one optimizer step, which left the learning rate at `lr`; its device values are booked when read."""
        self.step += 1
        self.examples += out.examples
        self.epoch_examples += out.examples
        self.last_step["lr"] = lr

    def read(self, steps: list[ReadStep], seconds: float) -> None:
        """Book the last `len(steps)` optimizer steps, read together after `seconds`. A non-finite one raises
        NonFiniteError with its exact step, and the counts go back to the steps before it (its update and those of
        the steps after it in the window are not taken into the results)."""
        first = self.step - len(steps) + 1
        for k, step in enumerate(steps):
            if step.nonfinite:
                self.step = first + k - 1
                later = sum(s.examples for s in steps[k:])
                self.examples -= later
                self.epoch_examples -= later
                raise NonFiniteError(first + k, NONFINITE_QUANTITY[step.nonfinite])
        for step in steps:
            self.epoch_loss_sum += step.loss * step.examples
            for key, values in {"loss": step.losses, **step.metrics}.items():
                self.log_window.setdefault(key, []).extend(values)
        # a log line's step time is the mean over the steps read with it: timing a single step would need a read
        self.last_step.update(grad_norm=steps[-1].grad_norm, step_time_s=seconds / len(steps))
        if self.timed_steps == 0:  # the run's first step, read alone: it pays one-off costs (allocations, lazy init)
            self.first_step_s = seconds
        else:
            self.later_steps_s += seconds
        self.timed_steps += len(steps)

    @property
    def mean_step_time_s(self) -> float:
        # the first step pays one-off costs (allocations, lazy init)
        return self.later_steps_s / (self.timed_steps - 1) if self.timed_steps > 1 else self.first_step_s
