"""The one small interface every training strategy implements.

A strategy gets a `StepContext` for one micro-batch and must leave the parameter gradients of that
micro-batch's training objective in `.grad` (through `ctx.backward`), returning the clean task loss for
logging. It may run as many forward/backward passes as it needs; the context counts them, so the
benchmark and `clue-adv strategies` report what a strategy really costs. The training loop only ever
calls `training_step`; it never looks at a strategy's name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from clue_adv.schema import StrictModel

Target = Literal["embedding_output", "embedding_matrix"]
MAX_TAG_BYTES = 200  # a strategy's directory name (its tag); filesystems allow 255 bytes per name


class StrategyConfig(StrictModel):
    """Fields every strategy block has; each strategy subclasses it with a `name: Literal[...]`."""

    name: str = Field(description="Which strategy (see `clue-adv strategies`).")
    tag: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.=+-]*$",
        max_length=80,
        description="Name of this variant in run directories and reports (e.g. `fgm-study`); default: the "
        "strategy name plus every parameter that differs from its default.",
    )

    def directory_tag(self) -> str:
        """This variant's directory name (`<experiment>/<task>/<tag>/seed-<k>`): `tag`, else the name plus every
        parameter that differs from its default, so a hyperparameter grid gets one directory per value
        (e.g. `fgm-epsilon=0.1`)."""
        if self.tag:
            return self.tag
        default = type(self).model_construct().model_dump()  # not validated: this check would recurse
        parts = [self.name]
        for key, value in self.model_dump().items():
            if key not in ("name", "tag") and value != default[key]:
                parts.append(f"{key}={value}")
        return "-".join(parts)

    @model_validator(mode="after")
    def _directory_tag_fits(self) -> StrategyConfig:
        tag = self.directory_tag()
        if len(tag.encode()) > MAX_TAG_BYTES:  # one directory level: filesystems allow 255 bytes
            raise ValueError(
                f"its run directory name '{tag[:40]}...' is {len(tag.encode())} bytes (at most {MAX_TAG_BYTES}); "
                "name the variant with strategy.tag"
            )
        return self


@dataclass(frozen=True)
class StepCost:
    """Passes one training step runs, as `clue-adv strategies` reports and the benchmark counts them."""

    forward: int
    backward: int
    double_backward: bool = False
    note: str = ""
    #: how many copies of the batch each pass runs on (consistency stacks it twice): the counter counts passes,
    #: while compute scales with the examples, so cost comparisons must use the `*_at_batch` figures.
    batch_factor: int = 1

    @property
    def forward_at_batch(self) -> int:
        """Forward passes over a batch of B examples this step is worth."""
        return self.forward * self.batch_factor

    @property
    def backward_at_batch(self) -> int:
        """Backward passes over a batch of B examples this step is worth."""
        return self.backward * self.batch_factor


@dataclass
class PassCounter:
    forward: int = 0
    backward: int = 0
    double_backward: int = 0

    def reset(self) -> None:
        self.forward = self.backward = self.double_backward = 0


@dataclass
class StepResult:
    """What a strategy returns: the clean task loss (for logging) and any extra scalars worth logging.

    Metrics are detached 0-dim tensors on the batch's device, or a float where no tensor is involved (nan: "not
    applicable"). The loop reads them once per logging window (`float(...)` when it writes the record): a float()
    here would stop the host until the GPU has finished the step, every micro-batch."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    token_type_ids: torch.Tensor | None = None
    #: the CPU tensors `input_ids` and `attention_mask` were copied from (`from_mapping`): index work on the
    #: tokens (the embedding-matrix target's rows) is done on them, with no device-to-host copy; None: not kept
    host_input_ids: torch.Tensor | None = field(default=None, repr=False, compare=False)
    host_attention_mask: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_mapping(cls, data: dict[str, torch.Tensor], device: torch.device) -> Batch:
        tt = data.get("token_type_ids")
        ids, mask = data["input_ids"], data["attention_mask"]
        return cls(
            input_ids=ids.to(device, non_blocking=True),
            attention_mask=mask.to(device, non_blocking=True),
            labels=data["labels"].to(device, non_blocking=True),
            token_type_ids=None if tt is None else tt.to(device, non_blocking=True),
            host_input_ids=ids if ids.device.type == "cpu" else None,
            host_attention_mask=mask if mask.device.type == "cpu" else None,
        )

    def host_tokens(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`input_ids` and `attention_mask` on the CPU: the copies `from_mapping` kept, else the tensors themselves
        copied to the host (free for a CPU batch, a synchronising copy for a GPU one)."""
        if self.host_input_ids is not None and self.host_attention_mask is not None:
            return self.host_input_ids, self.host_attention_mask
        return self.input_ids.cpu(), self.attention_mask.cpu()

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Upcast half precision (bf16/fp16 under autocast) to fp32, leave fp32/fp64 as they are: losses,
    divergences and perturbation norms are computed in fp32 at least (fp16 norms overflow; float64 tests
    must not be rounded)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class StepContext:
    """Everything a strategy may touch for one micro-batch.

    `x` below is the word-embedding output (B×T×H, before position/segment embeddings and LayerNorm):
    the tensor the study perturbs. `forward(x)` feeds it through the rest of the model via
    `inputs_embeds`, so the word-embedding weights still get their gradient through `embed()`.

    Gradient accumulation. An optimizer step may add up several micro-batches: a window of B examples,
    micro-batch k holding b_k of them. `loss_scale` is the micro-batch's share b_k/B and `backward`
    multiplies by it, so the window's objective is the mean over its EXAMPLES however it is split
    (8 = 4+4 = 4+2+2): Σ_k (b_k/B)·(mean over micro-batch k) = mean over the window. That holds as it is
    for every term that is a mean over examples of a per-example quantity: the task loss, batch-mean
    divergences, losses at perturbations normalised per example. A term built from g = ∇ₓ of the mean
    loss is different: on micro-batch k's x the window's gradient is (b_k/B)·g_k, not g_k (g_k is B/b_k
    times too large). Such a strategy evaluates its term on the window's gradient, `window_grad(g)`, and
    divides it by `loss_scale` before `backward` multiplies it back: ½ε‖g‖² then weighs ε·loss_scale in
    the micro-batch's objective, while a term of degree 1 in g (ε·Σ_b‖g_b‖) keeps ε. This is exact when
    every example has its own x (`embedding_output`); rows of the embedding matrix are shared between
    micro-batches, so a term with one norm over ∇_E is computed per micro-batch, and each strategy's
    `accumulation` says what that changes. Without accumulation loss_scale = 1: the batch's own objective.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        batch: Batch,
        *,
        label_smoothing: float = 0.0,
        loss_scale: float = 1.0,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        counter: PassCounter | None = None,
        special_token_ids: tuple[int, ...] = (),
    ) -> None:
        self.model = model
        self.batch = batch
        self.label_smoothing = label_smoothing
        # Gradient accumulation: this micro-batch's share of its window's examples (class docstring); every
        # backward into the parameters is scaled by it, so the micro-batches add up to the window's gradient.
        self.loss_scale = loss_scale
        self._autocast = autocast
        self._full_precision = False
        self.counter = counter if counter is not None else PassCounter()
        self.special_token_ids = special_token_ids

    # -- the model as a function of x ---------------------------------------------------------------
    @property
    def embedding(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def mask(self) -> torch.Tensor:
        """B×T×1 float mask: 1 on real tokens, 0 on padding (padding is never perturbed)."""
        return self.batch.attention_mask.unsqueeze(-1).to(torch.float32)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The run's precision context, for a strategy's own forward passes (e.g. an EMA teacher); no autocast
        inside `full_precision()`."""
        return contextlib.nullcontext() if self._full_precision else self._autocast()

    @property
    def half_precision(self) -> bool:
        """True when the run's forward passes autocast to bf16/fp16 (outside `full_precision()`)."""
        device = self.batch.input_ids.device.type
        with self._autocast():
            return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """fp32 for every pass inside, whatever the run's precision: for the passes that compare the model at points
        closer than one bf16 step of the activations (VAT's ξ-probe, SMART's 1e-5 radii). bf16 keeps 8 significant
        bits (relative step 2⁻⁸ ≈ 4e-3), so a perturbation below that is rounded away in the first matmul and the
        divergence the strategy differentiates is rounding noise. The model's weights are fp32 (autocast casts per
        op), so disabling autocast gives the exact fp32 pass; on a GPU it runs at fp32 speed. Also disables an
        autocast a caller may have entered around the whole step."""
        previous = self._full_precision
        self._full_precision = True
        device = self.batch.input_ids.device.type
        # (a device without autocast, e.g. `meta` in tests, has nothing to disable)
        off = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else None
        try:
            with off or contextlib.nullcontext():
                yield
        finally:
            self._full_precision = previous

    def embed(self) -> torch.Tensor:
        """The word-embedding output x for this batch, in the embedding's dtype (fp32 outside autocast)."""
        return self.embedding(self.batch.input_ids)

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the model on word-embedding output `x` (default: a fresh `embed()`)."""
        if x is None:
            x = self.embed()
        self.counter.forward += 1
        with self.autocast():
            out = self.model(
                inputs_embeds=x,
                attention_mask=self.batch.attention_mask,
                token_type_ids=self.batch.token_type_ids,
            )
        return at_least_fp32(out.logits)

    def loss(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy on the batch labels (with the configured label smoothing)."""
        return F.cross_entropy(logits, self.batch.labels, label_smoothing=self.label_smoothing)

    # -- gradients ----------------------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, *, retain_graph: bool = False) -> None:
        """Accumulate ∇θ of `loss` into the parameters' `.grad` (scaled for gradient accumulation)."""
        self.counter.backward += 1
        (loss * self.loss_scale).backward(retain_graph=retain_graph)

    def window_grad(self, g: torch.Tensor) -> torch.Tensor:
        """∇ₓ of the window's mean loss on this micro-batch's x, from g = ∇ₓ of the micro-batch's mean loss: the
        g a gradient penalty must use to be independent of how the window is split (class docstring)."""
        return g * self.loss_scale

    def grad(
        self, output: torch.Tensor, inputs: torch.Tensor, *, create_graph: bool = False, retain_graph: bool = False
    ) -> torch.Tensor:
        """∂output/∂inputs without touching parameter `.grad`; `create_graph=True` makes it differentiable."""
        self.counter.backward += 1
        if create_graph:
            self.counter.double_backward += 1
        (g,) = torch.autograd.grad(output, inputs, create_graph=create_graph, retain_graph=retain_graph or create_graph)
        return g

    @contextlib.contextmanager
    def frozen_dropout(self) -> Iterator[None]:
        """Evaluation mode for a pass that must be deterministic (e.g. a clean teacher distribution)."""
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)


class Strategy:
    """Base class: subclasses set `config_class`, `cost()` and implement `training_step`."""

    config_class: ClassVar[type[StrategyConfig]]
    #: short description shown by `clue-adv strategies`
    summary: ClassVar[str] = ""
    #: how the objective depends on the split of a window into micro-batches (gradient accumulation, see
    #: StepContext), shown by `clue-adv strategies NAME`: say where it is not split-invariant, and why
    accumulation: ClassVar[str] = ""

    def __init__(self, config: StrategyConfig) -> None:
        self.config = config

    @property
    def needs_double_backward(self) -> bool:
        """True when the step differentiates a gradient: the model must use an attention with double backward."""
        return self.cost().double_backward

    def cost(self) -> StepCost:
        raise NotImplementedError

    def setup(self, model: torch.nn.Module) -> None:  # noqa: B027 - optional hook
        """Called once after the model is built (e.g. to make an EMA teacher copy)."""

    def after_optimizer_step(self, model: torch.nn.Module) -> None:  # noqa: B027 - optional hook
        """Called after every optimizer step (e.g. to update an EMA teacher)."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """State the strategy carries from step to step (e.g. an EMA teacher's weights), for a resumable
        checkpoint; stateless strategies have none."""
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:  # noqa: B027 - optional hook
        """Put back what `state_dict` returned (called after `setup`)."""

    def training_step(self, ctx: StepContext) -> StepResult:
        raise NotImplementedError
