"""Gradient accumulation must not change the objective: one batch of 8 = micro-batches of 4+4 = 4+2+2.

The training loop weighs each micro-batch by its share of the window's examples (loss_scale = b_k/B), so the
window's gradient is that of the mean over its examples however it is split (StepContext). Every strategy is
checked on `target: embedding_output` in float64 with dropout 0: the parameter gradient of the whole batch and of
its splits (4+2+2 is an epoch's short last window) must agree. Random draws are replayed: the whole batch's step
records each draw, and a micro-batch of examples lo:hi gets the same examples' rows of it (every draw is
independent per example, so those rows are a fair draw for the micro-batch). Where a strategy is documented as not
split-invariant (one norm over the embedding matrix, `epsilon_unit: relative`), the documented behaviour is tested.
This also covers the peers' multi-GPU pitfall in its accumulation form: an extra loss scaled differently from the
clean loss would count K times over K micro-batches.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import SENTENCES, make_ctx, tiny_bert

from clue_adv.regularizers import build_strategy, jacobian_penalty, registry
from clue_adv.regularizers.base import Batch, Strategy
from clue_adv.regularizers.freelb import FreeLB
from clue_adv.regularizers.perturb import PerturbationSpace

CLASSES = 4
SPLITS = [(8,), (4, 4), (4, 2, 2)]
SENTENCES_8 = [*SENTENCES, "今天天气很好", "中国女排夺冠，举国欢庆", "手机", "如何评价这部电影的结局？"]

# Absolute sizes for this float64 tiny BERT (hidden 16: an example's x has norm ≈ 0.3), large enough that every
# regularizer's part of the gradient is far above float64 round-off, small enough to stay a perturbation.
OUTPUT_CASES: list[tuple[str, dict[str, Any]]] = [
    ("none", {}),
    ("gaussian_noise", {"sigma": 0.02}),
    ("consistency", {"sigma": 0.02}),
    ("consistency", {"sigma": 0.02, "divergence": "mse", "ce_on_both": True, "same_dropout_mask": True}),
    ("fgm", {"epsilon": 0.1}),
    ("fgm", {"epsilon": 0.005, "norm": "sign", "combine": "adversarial_only"}),
    ("pgd", {"epsilon": 0.1, "alpha": 0.04}),
    ("pgd", {"epsilon": 0.005, "alpha": 0.002, "norm": "linf", "random_start": True}),
    ("freelb", {"adv_lr": 0.05, "init_magnitude": 0.1, "max_norm": 0.08}),
    ("vat", {"epsilon": 0.1, "iterations": 2}),
    ("smart", {"epsilon": 0.02, "step_size": 0.01, "noise_std": 0.005}),
    ("gradient_penalty", {"mode": "exact"}),
    ("gradient_penalty", {"mode": "normalized", "epsilon": 0.1}),
    ("gradient_penalty", {"mode": "finite_difference", "h": 0.1}),
    ("jacobian_penalty", {"weight": 1.0, "samples": 2}),
]


def test_every_strategy_is_checked_and_documented():
    """A new strategy must join OUTPUT_CASES and say in `accumulation` how a split into micro-batches affects it."""
    assert {name for name, _ in OUTPUT_CASES} == set(registry())
    assert all(cls.accumulation for cls in registry().values())


def test_strategies_name_shows_what_a_split_changes():
    """`clue-adv strategies NAME` prints the strategy's `accumulation` note (and --json carries it)."""
    from typer.testing import CliRunner

    from clue_adv.cli import app

    runner = CliRunner()
    text = " ".join(runner.invoke(app, ["strategies", "gradient_penalty"], terminal_width=400).output.split())
    assert "gradient accumulation" in text and "embedding_matrix: NOT split-invariant" in text
    rows = json.loads(runner.invoke(app, ["strategies", "fgm", "--json"]).output)
    assert rows[0]["accumulation"] == registry()["fgm"].accumulation


def case_id(case: tuple[str, dict[str, Any]]) -> str:
    name, values = case
    return "-".join([name, *(f"{k}={v}" for k, v in values.items())])


def model64() -> torch.nn.Module:
    return tiny_bert(CLASSES, hidden=16, layers=1, dtype=torch.float64, dropout=0.0)


@pytest.fixture
def batch8(tokenizer) -> Batch:
    """Eight titles of different lengths (padding in every micro-batch), labels cycling over the classes."""
    enc = tokenizer(SENTENCES_8, padding=True, return_tensors="pt")
    enc["labels"] = torch.arange(8) % CLASSES
    return Batch.from_mapping(dict(enc), torch.device("cpu"))


def rows(batch: Batch, lo: int, hi: int) -> Batch:
    tt = batch.token_type_ids
    return Batch(
        batch.input_ids[lo:hi], batch.attention_mask[lo:hi], batch.labels[lo:hi], None if tt is None else tt[lo:hi]
    )


class ReplayedDraws:
    """Makes every random draw of a strategy step (noise, random starts, FreeLB's δ₀, Jacobian signs) the whole
    batch's: recorded during the step on all 8 examples, replayed as the rows lo:hi for a micro-batch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.recorded: list[torch.Tensor] = []
        self.window: tuple[int, int] | None = None
        self.next = 0
        for owner, name in [
            (PerturbationSpace, "gaussian"),
            (PerturbationSpace, "random"),
            (FreeLB, "initial_delta"),
            (jacobian_penalty, "rademacher_signs"),
        ]:
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, draw: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def replayed(*args: Any, **kwargs: Any) -> torch.Tensor:
            if self.window is None:
                self.recorded.append(draw(*args, **kwargs))
                return self.recorded[-1]
            lo, hi = self.window
            self.next += 1
            return self.recorded[self.next - 1][lo:hi]

        return replayed

    def micro_batch(self, lo: int, hi: int) -> None:
        self.window, self.next = (lo, hi), 0


def window_grad(
    strategy: Strategy, model: torch.nn.Module, batch: Batch, split: tuple[int, ...], draws: ReplayedDraws | None
) -> torch.Tensor:
    """The parameter gradient one optimizer step accumulates over `split` (micro-batch sizes), each micro-batch
    weighted by its share of the window's examples, as clue_adv/train.py does."""
    model.zero_grad(set_to_none=True)
    lo = 0
    for size in split:
        if draws is not None and split != (batch.size,):
            draws.micro_batch(lo, lo + size)
        strategy.training_step(make_ctx(model, rows(batch, lo, lo + size), loss_scale=size / batch.size))
        lo += size
    grad = torch.cat(
        [torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten() for p in model.parameters()]
    )
    model.zero_grad(set_to_none=True)
    return grad


def config_for(name: str, **values: Any):
    return registry()[name].config_class(**values)


@pytest.mark.parametrize("case", OUTPUT_CASES, ids=case_id)
def test_every_strategy_gives_one_gradient_however_the_batch_is_split(batch8, monkeypatch, case):
    """embedding_output: 8 = 4+4 = 4+2+2 to float64 round-off. Measured on the regularizer's own part of the
    gradient (minus the clean loss's, which is split-invariant whatever a strategy does), so that a mis-scaled
    extra term cannot hide behind the task loss."""
    name, values = case
    model = model64()
    strategy = build_strategy(config_for(name, **values))
    strategy.setup(model)
    clean = window_grad(build_strategy(config_for("none")), model, batch8, (8,), None)
    draws = ReplayedDraws(monkeypatch)
    whole = window_grad(strategy, model, batch8, (8,), draws)
    part = whole - clean
    if name != "none":
        assert float(part.norm()) > 1e-3 * float(clean.norm())  # the regularizer really acts
    for split in SPLITS[1:]:
        grad = window_grad(strategy, model, batch8, split, draws)
        assert float((grad - whole).norm()) <= 1e-9 * float(part.norm() if name != "none" else whole.norm()), split


@pytest.mark.parametrize("split", SPLITS[1:])
def test_unit_finite_difference_is_split_invariant_up_to_its_step(batch8, split):
    """`fd_step: unit` steps h along ĝ of each micro-batch (its norm over the micro-batch, not the window), so the
    splits agree to O(h), the finite difference's own error, not to round-off: measured 4e-5 at h = 1e-4, 4e-4 at
    1e-3 (and 0.09-0.14 at the default 0.1) of the penalty's part. A penalty weight off by the micro-batch's share
    (the old rule) would be off by 100% or more."""
    model = model64()
    clean = window_grad(build_strategy(config_for("none")), model, batch8, (8,), None)
    strategy = build_strategy(config_for("gradient_penalty", mode="finite_difference", fd_step="unit", h=1e-4))
    whole = window_grad(strategy, model, batch8, (8,), None)
    grad = window_grad(strategy, model, batch8, split, None)
    assert float((grad - whole).norm()) < 2e-3 * float((whole - clean).norm())


def per_micro_batch_penalty_by_hand(
    model: torch.nn.Module, batch: Batch, split: tuple[int, ...], mode: str, epsilon: float
) -> torch.Tensor:
    """∇θ Σ_k [s_k·L_k + P(s_k·G_k)], s_k = b_k/B, G_k = ∇_E L_k over the dense V×H embedding weight, P = ½ε‖·‖²
    or ε‖·‖: the matrix penalty as documented (cross terms between micro-batches dropped), by plain autograd."""
    model.zero_grad(set_to_none=True)
    weight = model.get_input_embeddings().weight
    lo = 0
    for size in split:
        ctx = make_ctx(model, rows(batch, lo, lo + size))
        loss = ctx.loss(ctx.forward())
        (g,) = torch.autograd.grad(loss, weight, create_graph=True)
        share = size / batch.size
        penalty = epsilon * (share * g).norm() if mode == "normalized" else 0.5 * epsilon * (share * g).pow(2).sum()
        (share * loss + penalty).backward()
        lo += size
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad(set_to_none=True)
    return grad


@pytest.mark.parametrize(("mode", "epsilon"), [("exact", 1.0), ("normalized", 0.1)])
def test_matrix_gradient_penalty_is_per_micro_batch_as_documented(batch8, mode, epsilon):
    """embedding_matrix is not split-invariant (the docstring and `clue-adv strategies gradient_penalty` say so):
    each micro-batch penalises its own share of ∇_E, P(s_k·G_k), and the cross terms between micro-batches that
    the whole batch's P(Σ_k s_k·G_k) has are lost. Both halves of that statement, against autograd by hand."""
    model = model64()
    strategy = build_strategy(config_for("gradient_penalty", target="embedding_matrix", mode=mode, epsilon=epsilon))
    clean = window_grad(build_strategy(config_for("none")), model, batch8, (8,), None)
    whole = window_grad(strategy, model, batch8, (8,), None)
    for split in SPLITS:
        grad = window_grad(strategy, model, batch8, split, None)
        want = per_micro_batch_penalty_by_hand(model, batch8, split, mode, epsilon)
        assert float((grad - want).norm()) < 1e-9 * float((want - clean).norm()), split
        if split != (8,):  # [CLS], [SEP] and shared characters: the dropped cross terms are not small
            assert float((grad - whole).norm()) > 0.05 * float((whole - clean).norm()), split


def test_matrix_gradient_penalty_needs_no_cross_terms_when_micro_batches_share_no_token(batch8):
    """The flip side: micro-batches whose tokens are all different have ∇_E on disjoint rows, so there are no cross
    terms and the matrix penalty is split-invariant after all (rows 0-3 and 4-7 get disjoint made-up ids)."""
    ids = batch8.input_ids.clone()
    real = batch8.attention_mask.bool()
    ids[:4][real[:4]] = 1000 + ids[:4][real[:4]] % 500  # two disjoint ranges of ordinary characters
    ids[4:][real[4:]] = 2000 + ids[4:][real[4:]] % 500
    disjoint = Batch(ids, batch8.attention_mask, batch8.labels, batch8.token_type_ids)
    model = model64()
    strategy = build_strategy(config_for("gradient_penalty", target="embedding_matrix"))
    clean = window_grad(build_strategy(config_for("none")), model, disjoint, (8,), None)
    whole = window_grad(strategy, model, disjoint, (8,), None)
    grad = window_grad(strategy, model, disjoint, (4, 4), None)
    assert float((grad - whole).norm()) < 1e-9 * float((whole - clean).norm())


def hadamard(n: int) -> torch.Tensor:
    """n×n ±1 matrix with orthogonal columns (Sylvester; n a power of two)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def test_matrix_jacobian_penalty_is_split_invariant_in_expectation(batch8, monkeypatch):
    """embedding_matrix: one sign draw's cross-example terms depend on the split, their expectation (zero) does
    not. The 32 rows of a 32×32 Hadamard matrix, used as the 32 sign vectors η (8 examples × 4 classes), satisfy
    mean_j η_j η_jᵀ = I exactly, like the expectation over random signs: averaged over them the estimate IS its
    expectation, and the gradient is split-invariant; each single draw is not."""
    signs = hadamard(8 * CLASSES)
    state = {"lo": 0, "hi": 8, "next": 0}

    def hadamard_signs(shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
        row = signs[state["next"] % len(signs)].view(8, CLASSES)[state["lo"] : state["hi"]]
        state["next"] += 1
        assert row.shape == tuple(shape)
        return row.to(torch.float32)

    monkeypatch.setattr(jacobian_penalty, "rademacher_signs", hadamard_signs)
    model = model64()

    def grad_over(split: tuple[int, ...], samples: int) -> torch.Tensor:
        strategy = build_strategy(
            config_for("jacobian_penalty", target="embedding_matrix", weight=1.0, samples=samples)
        )
        model.zero_grad(set_to_none=True)
        lo = 0
        for size in split:
            state.update(lo=lo, hi=lo + size, next=0)
            strategy.training_step(make_ctx(model, rows(batch8, lo, lo + size), loss_scale=size / 8))
            lo += size
        grad = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        return grad

    clean = window_grad(build_strategy(config_for("none")), model, batch8, (8,), None)
    expectation = grad_over((8,), len(signs))
    for split in SPLITS[1:]:
        assert float((grad_over(split, len(signs)) - expectation).norm()) < 1e-9 * float((expectation - clean).norm())
    one_draw = grad_over((8,), 1)  # a single draw: the split changes its cross terms
    assert float((grad_over((4, 4), 1) - one_draw).norm()) > 0.01 * float((one_draw - clean).norm())


def same_noise_per_row(monkeypatch: pytest.MonkeyPatch) -> None:
    """embedding_matrix draws noise per used row of E (rows, not examples, so ReplayedDraws cannot slice it): fix
    each row's noise by its token id, one table for all, whichever micro-batch draws it."""
    table = torch.randn(21128, 16, generator=torch.Generator().manual_seed(0))

    def gaussian(self: PerturbationSpace, std: float, generator: torch.Generator | None = None) -> torch.Tensor:
        return std * table[self.row_ids]

    monkeypatch.setattr(PerturbationSpace, "gaussian", gaussian)


@pytest.mark.parametrize("case", [("gaussian_noise", {"sigma": 0.02}), ("consistency", {"sigma": 0.02})], ids=case_id)
def test_matrix_noise_is_split_invariant_for_the_same_noise_per_row(batch8, monkeypatch, case):
    """`embedding_matrix` noise is documented as split-invariant in expectation, not per draw: a split only changes
    which tokens of different micro-batches share a draw. Given each row the same noise whichever micro-batch uses
    it, the gradient is the same: it depends on each example's own noise, whose distribution no split changes."""
    name, values = case
    same_noise_per_row(monkeypatch)
    model = model64()
    strategy = build_strategy(config_for(name, target="embedding_matrix", **values))
    clean = window_grad(build_strategy(config_for("none")), model, batch8, (8,), None)
    whole = window_grad(strategy, model, batch8, (8,), None)
    assert float((whole - clean).norm()) > 1e-3 * float(clean.norm())
    for split in SPLITS[1:]:
        grad = window_grad(strategy, model, batch8, split, None)
        assert float((grad - whole).norm()) < 1e-9 * float((whole - clean).norm()), split


@pytest.mark.parametrize(
    "case",
    [
        ("fgm", {"epsilon": 0.1}),
        ("pgd", {"epsilon": 0.1, "alpha": 0.04}),
        ("freelb", {"adv_lr": 0.05, "init_magnitude": 0.1, "max_norm": 0.08}),
        ("vat", {"epsilon": 0.1}),
        ("smart", {"epsilon": 0.02, "step_size": 0.01, "noise_std": 0.005}),
    ],
    ids=case_id,
)
@pytest.mark.parametrize("variant", ["embedding_matrix", "relative"])
def test_documented_exceptions_do_depend_on_the_split(batch8, monkeypatch, case, variant):
    """What `clue-adv strategies NAME` says is not split-invariant really is not, so the note cannot go stale
    silently: one norm over the embedding rows a micro-batch uses (`embedding_matrix`), or a relative unit measured
    on the micro-batch (`epsilon_unit: relative`), changes the gradient of a 4+4 split, for the same draws (the
    same noise per row for the matrix; FreeLB's δ₀ there is 0, its random init being per row too)."""
    name, values = case
    assert "NOT split-invariant" in registry()[name].accumulation and "relative" in registry()[name].accumulation
    if variant == "embedding_matrix":
        values = {**values, "target": "embedding_matrix", **({"init_magnitude": 0.0} if name == "freelb" else {})}
        same_noise_per_row(monkeypatch)
        draws = None
    else:
        values = {**values, "epsilon_unit": "relative"}
    model = model64()
    strategy = build_strategy(config_for(name, **values))
    strategy.setup(model)
    clean = window_grad(build_strategy(config_for("none")), model, batch8, (8,), None)
    if variant == "relative":
        draws = ReplayedDraws(monkeypatch)
    whole = window_grad(strategy, model, batch8, (8,), draws)
    grad = window_grad(strategy, model, batch8, (4, 4), draws)
    # Measured: 1e-2 to 0.1 of the regularizer's part for the matrix (1.5e-5 for SMART, whose ascent is scaled by
    # ‖g‖_∞, here nearly the same over the micro-batch's rows as over the batch's), 3e-4 to 0.2 for relative units
    # ("slightly"); split-invariant steps agree to < 1e-11 (the test above).
    assert float((grad - whole).norm()) > 1e-6 * float((whole - clean).norm())
