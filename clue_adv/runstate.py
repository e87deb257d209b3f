"""What a training run is made of and where it stands: the types `train` builds and changes, and that the
checkpoint (`checkpoint.py`) and the summary (`summary.py`) read, kept apart from the recipe so that those
modules need not import it."""

from __future__ import annotations

import contextlib
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
    log_window: dict[str, list[torch.Tensor | float]] = field(default_factory=dict)  # per micro-batch, since last log
    last_step: dict[str, float] = field(default_factory=dict)  # the latest step's lr, grad_norm and time
    epoch_loss_sum: float = 0.0  # this epoch's clean loss summed over its examples: the final training loss
    epoch_examples: int = 0
    resumed_from: list[int] = field(default_factory=list)  # the epochs this run was resumed after
    # eval.early_stopping: the accuracy to beat (by min_delta) and the evaluations since it was set
    reference_accuracy: float | None = None
    evals_without_improvement: int = 0
    stopped_early_at: tuple[int, int] | None = None  # (epoch, step)
    train_time_s: float = 0.0  # training only: evaluation, diagnostics and checkpoints excluded
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
