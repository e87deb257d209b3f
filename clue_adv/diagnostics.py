"""Diagnostics: measure the mechanism the study argues for, on a fixed subset of dev and train examples.

The study's argument is that Gaussian noise on the embeddings penalises the input curvature ½σ²·tr ∇ₓ²ℓ,
adversarial training penalises the input-gradient norm ‖∇ₓℓ‖, and a loss flatter around the inputs generalises
better. These functions measure, for a given model, what those statements are about (docs/DIAGNOSTICS.md); the
per-batch measurements are in clue_adv/input_measures.py, this module picks the subsets, runs them and names the
results:

* the input-gradient norm ‖∇ₓℓ‖ per example (x = the word-embedding output, real tokens only);
* the input curvature tr ∇ₓ²ℓ per example, by Hutchinson's estimator (Rademacher probes v, E vᵀHv = tr H), one
  Hessian-vector product (double backward) per probe;
* accuracy under an FGM and a PGD attack on x at radii ε stated relative to each example's own ‖x‖;
* loss and accuracy on the train subset beside the dev subset (the generalisation gap).

Everything runs in evaluation mode (no dropout), in the model's own precision (second derivatives in bf16 are
noise), and through `torch.autograd.grad` with respect to x only: parameters, their `.grad`, the training mode,
the attention implementation and the global random state are exactly as they were before. Subsets and probes
come from generators seeded by (seed, split), so two runs with the same seed are measured on the same examples
with the same probes: their differences are paired.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, field_validator

from clue_adv.data import _collator
from clue_adv.input_measures import measure_batch
from clue_adv.regularizers.base import Batch
from clue_adv.schema import StrictModel

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

PREFIX = "diag/"
Split = Literal["dev", "train"]
AttackMethod = Literal["fgm", "pgd"]


class DiagnosticsConfig(StrictModel):
    """What the diagnostics measure and when (docs/DIAGNOSTICS.md)."""

    enabled: bool = Field(
        True,
        description="Measure input-gradient norm, input curvature, accuracy under attack and the generalisation gap "
        "(docs/DIAGNOSTICS.md). On by default: they are how a report tells whether a strategy did what the theory "
        "says. Recorded in summary.json (`diagnostics`: best and final model) and metrics.jsonl (`type: "
        "diagnostics` lines); their wall time in `diagnostics_wall_time_s`, apart from `train_wall_time_s` (a few "
        "seconds on the smoke config). false: nothing is measured or recorded.",
    )
    when: Literal["end", "every_eval"] = Field(
        "end",
        description="`end`: once, on the best and on the final model; `every_eval`: at every dev evaluation too "
        "(how they evolve during training, at that many times the cost).",
    )
    examples: int = Field(
        128,
        gt=0,
        description="Dev examples measured (all when dev is smaller), and as many train examples for the gap. 128: a "
        "few seconds per call for the smoke model on 2 CPU cores (results/bench/diagnostics-cost.md). The curvature "
        "varies far more between examples than with the probes: raise this, not `probes`, for a tighter mean.",
    )
    batch_size: int = Field(
        32,
        gt=0,
        description="Examples per diagnostics batch. 32, the study's training batch: the curvature pass keeps the "
        "graph of the gradient (double backward), so it needs more memory than a training step at the same batch.",
    )
    probes: int = Field(
        2,
        ge=0,
        description="Rademacher probes per example for the curvature estimate (one Hessian-vector product each); "
        "0 skips the curvature. 2, the fewest that give each example a standard error: on the smoke model the "
        "probes' share of the curvature mean's variance is then about a tenth, the spread between examples the rest "
        "(results/bench/diagnostics-cost.md), and the curvature costs about as much as the attacks.",
    )
    epsilons: list[float] = Field(
        [0.01, 0.03, 0.1],
        description="Attack radii as fractions of each example's own word-embedding norm ‖x‖ (real tokens), so one "
        "grid serves tiny random-init and pretrained models, whose embeddings differ several-fold in size; [] skips "
        "the attacks. On the smoke model 0.01 flips a few predictions and 0.1 nearly all "
        "(results/bench/diagnostics-cost.md).",
    )
    pgd_steps: int = Field(
        3,
        ge=1,
        description="PGD ascent steps per radius (step 2.5ε/K). 3: as strong as 10 steps at the default radii on the "
        "smoke model (results/bench/diagnostics-cost.md), for 3 forward and 2 backward passes per radius.",
    )
    seed: int | None = Field(
        None,
        ge=0,
        le=2**32 - 1,
        description="Seed of the subsets and probes. null: the run's seed, so runs of different strategies with the "
        "same seed are measured on the same examples with the same probes (paired), and the spread over seeds "
        "includes the choice of examples. A number fixes them for every seed.",
    )

    @field_validator("epsilons")
    @classmethod
    def _positive_sorted(cls, v: list[float]) -> list[float]:
        # Sorted: the PGD accuracy at a radius counts every attack at the radii below it (see `attack_accuracy`).
        if any(e <= 0 for e in v):
            raise ValueError("every ε must be > 0 (ε = 0 is the clean accuracy, always measured)")
        return sorted(set(v))

    def resolved_seed(self, run_seed: int) -> int:
        return run_seed if self.seed is None else self.seed


# --------------------------------------------------------------------------------------------------
# Metric names


def metric(split: Split | Literal["gap"], quantity: str) -> str:
    """`diag/<split>/<quantity>`, e.g. `diag/dev/input_grad_norm_mean`."""
    return f"{PREFIX}{split}/{quantity}"


def attack_metric(method: AttackMethod, quantity: Literal["accuracy", "loss"], epsilon: float) -> str:
    """`diag/dev/<method>_<quantity>/eps=<ε>`, e.g. `diag/dev/pgd_accuracy/eps=0.03` (ε relative, as configured)."""
    return f"{PREFIX}dev/{method}_{quantity}/eps={epsilon:g}"


def parse_attack_metric(name: str) -> tuple[AttackMethod, str, float] | None:
    """(method, quantity, ε) of an `attack_metric` name, or None for any other name."""
    head, sep, eps = name.rpartition("/eps=")
    if not sep or not head.startswith(f"{PREFIX}dev/"):
        return None
    method, _, quantity = head.removeprefix(f"{PREFIX}dev/").partition("_")
    if method not in ("fgm", "pgd") or quantity not in ("accuracy", "loss"):
        return None
    try:
        return method, quantity, float(eps)  # type: ignore[return-value]
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# Seeded subsets


def split_seed(seed: int, split: str) -> int:
    """A seed for one (seed, split) pair: the dev and train subsets (and probes) are independent draws."""
    return int.from_bytes(hashlib.sha256(f"clue_adv.diagnostics/{seed}/{split}".encode()).digest()[:8], "big") >> 1


def subset_indices(total: int, count: int, seed: int, split: str) -> list[int]:
    """`min(count, total)` distinct indices of 0..total-1, drawn by (seed, split) alone, in increasing order."""
    generator = torch.Generator().manual_seed(split_seed(seed, split))
    return sorted(torch.randperm(total, generator=generator)[: min(count, total)].tolist())


def subset_batches(
    dataset: Dataset,
    indices: Sequence[int],
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    pad_to_multiple_of: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """The tokenized examples at `indices` as padded batches (CPU tensors), sorted by length: little padding,
    and the same batches, hence the same probe draws, for every run measuring the same indices."""
    rows = dataset.select(list(indices))
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]["input_ids"]), i))
    collate = _collator(tokenizer, pad_to_multiple_of)
    return [
        dict(collate([rows[i] for i in order[start : start + batch_size]]))
        for start in range(0, len(order), batch_size)
    ]


# --------------------------------------------------------------------------------------------------
# The model, made ready for the pass and put back as it was


@contextlib.contextmanager
def measuring(model: torch.nn.Module, double_backward: bool) -> Iterator[None]:
    """Evaluation mode (no dropout), the uncompiled forward, and eager attention when a double backward is
    needed (fused SDPA kernels have none), whatever the run uses; everything restored afterwards."""
    was_training = model.training
    # nn.Module.compile keeps the compiled call here; torch.compile has no double backward, and the shapes
    # measured here would only trigger recompilations.
    compiled = model.__dict__.get("_compiled_call_impl")
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    switch = double_backward and attention not in (None, "eager") and hasattr(model, "set_attn_implementation")
    model.eval()
    if compiled is not None:
        model._compiled_call_impl = None
    if switch:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if switch:
            model.set_attn_implementation(attention)
        if compiled is not None:
            model._compiled_call_impl = compiled
        model.train(was_training)


# --------------------------------------------------------------------------------------------------
# A whole split, and the full set of diagnostics


@dataclass
class DiagnosticsResult:
    """The flat metric dict (documented names, see docs/DIAGNOSTICS.md) and the wall time it took."""

    metrics: dict[str, float] = field(default_factory=dict)
    wall_time_s: float = 0.0


def _median(values: torch.Tensor) -> float:
    return float(torch.quantile(values.double(), 0.5))


def measure_split(
    model: torch.nn.Module,
    batches: Iterable[Batch | Mapping[str, torch.Tensor]],
    split: Split,
    config: DiagnosticsConfig,
    seed: int,
    *,
    attacks: bool,
) -> dict[str, float]:
    """The `diag/<split>/...` metrics over `batches` (call inside `measuring`). Probes come from a generator
    seeded by (seed, split) alone."""
    generator = torch.Generator().manual_seed(split_seed(seed, f"{split}/probes"))
    parts = [
        measure_batch(
            model,
            batch,
            probes=config.probes,
            generator=generator,
            epsilons=config.epsilons if attacks else (),
            pgd_steps=config.pgd_steps,
        )
        for batch in batches
    ]
    if not parts:
        return {}

    def cat(name: str, dim: int = 0) -> torch.Tensor:
        return torch.cat([getattr(p, name).double().cpu() for p in parts], dim=dim)

    grad_norm = cat("input_grad_norm")
    n = grad_norm.numel()
    values = {
        "examples": float(n),
        "loss": float(cat("loss").mean()),
        "accuracy": float(cat("correct").mean()),
        "input_grad_norm_mean": float(grad_norm.mean()),
        "input_grad_norm_median": _median(grad_norm),
        "embedding_norm_mean": float(cat("embedding_norm").mean()),
    }
    if config.probes > 0:
        curvature, probe_se = cat("curvature"), cat("curvature_se")
        values |= {
            "input_curvature_mean": float(curvature.mean()),
            "input_curvature_median": _median(curvature),
            # Over examples: the per-example estimates vary with the example and with the probes; both are in it.
            "input_curvature_se": float(curvature.std() / math.sqrt(n)) if n > 1 else math.nan,
            # The probes' share alone (the examples held fixed): whether more probes would help.
            "input_curvature_probe_se": float(probe_se.pow(2).sum().sqrt() / n),
        }
    out = {metric(split, k): v for k, v in values.items()}
    if attacks and config.epsilons:
        fgm_correct, fgm_loss = cat("fgm_correct", 1), cat("fgm_loss", 1)
        pgd_correct, pgd_loss = cat("pgd_correct", 1), cat("pgd_loss", 1)
        for i, epsilon in enumerate(config.epsilons):
            out[attack_metric("fgm", "accuracy", epsilon)] = float(fgm_correct[i].mean())
            out[attack_metric("fgm", "loss", epsilon)] = float(fgm_loss[i].mean())
            out[attack_metric("pgd", "accuracy", epsilon)] = float(pgd_correct[i].mean())
            out[attack_metric("pgd", "loss", epsilon)] = float(pgd_loss[i].mean())
    return out


def diagnose(
    model: torch.nn.Module,
    dev_batches: Iterable[Batch | Mapping[str, torch.Tensor]],
    train_batches: Iterable[Batch | Mapping[str, torch.Tensor]] | None,
    config: DiagnosticsConfig,
    *,
    seed: int,
) -> DiagnosticsResult:
    """Every diagnostic of `config` for `model`: dev (with the attacks), train (without), and the gap.

    `seed` is the resolved one (`config.resolved_seed(run_seed)`); the batches are the seeded subsets
    (`subset_indices` + `subset_batches`). The model, its `.grad`, its training mode and attention, and the
    global random state are left as they were."""
    start = time.perf_counter()
    device = next(model.parameters()).device
    with measuring(model, double_backward=config.probes > 0):
        metrics = measure_split(model, dev_batches, "dev", config, seed, attacks=True)
        if train_batches is not None:
            metrics |= measure_split(model, train_batches, "train", config, seed, attacks=False)
    if metric("train", "loss") in metrics and metric("dev", "loss") in metrics:
        metrics[metric("gap", "loss")] = metrics[metric("dev", "loss")] - metrics[metric("train", "loss")]
        metrics[metric("gap", "accuracy")] = metrics[metric("train", "accuracy")] - metrics[metric("dev", "accuracy")]
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # honest wall time
    wall = time.perf_counter() - start
    metrics[f"{PREFIX}wall_time_s"] = wall
    return DiagnosticsResult(metrics, wall)


def diagnostic_batches(
    dev: Dataset,
    train: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    config: DiagnosticsConfig,
    seed: int,
    pad_to_multiple_of: int | None = None,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """The seeded dev subset (`config.examples`, all of dev when smaller) and a train subset of the same size,
    as padded batches. Build them once per run: every later call of `diagnose` measures the same examples."""
    dev_idx = subset_indices(len(dev), config.examples, seed, "dev")
    train_idx = subset_indices(len(train), len(dev_idx), seed, "train")
    return (
        subset_batches(dev, dev_idx, tokenizer, config.batch_size, pad_to_multiple_of),
        subset_batches(train, train_idx, tokenizer, config.batch_size, pad_to_multiple_of),
    )
