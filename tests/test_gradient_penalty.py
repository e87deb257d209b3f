"""Gradient penalty: each mode's parameter gradient against finite differences, the pitfall, the cost.

Finite-difference checks use a float64 model and a context whose forward keeps float64 logits: the real
StepContext rounds logits to fp32 (right for training), and that rounding, amplified by 1/h, would
swamp the differences these tests measure.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_ctx, tiny_bert

from clue_adv.config import ModelConfig
from clue_adv.model import attention_for
from clue_adv.regularizers.base import StepContext
from clue_adv.regularizers.consistency import Consistency, ConsistencyConfig
from clue_adv.regularizers.fgm import FGM, FGMConfig
from clue_adv.regularizers.gradient_penalty import GradientPenalty, GradientPenaltyConfig
from clue_adv.regularizers.jacobian_penalty import JacobianPenalty, JacobianPenaltyConfig
from clue_adv.regularizers.none import NoneConfig, NoRegularizer

TARGETS = ["embedding_output", "embedding_matrix"]
SPECIAL_IDS = (0, 100, 101, 102, 103)


def model64(dropout: float = 0.0, attn: str = "eager") -> torch.nn.Module:
    return tiny_bert(4, hidden=16, layers=1, dtype=torch.float64, dropout=dropout, attn=attn)


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat(
        [torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten() for p in model.parameters()]
    )


def step(strategy, model, batch, *, context=StepContext):
    """Run one training step from zero gradients; return (flat parameter gradient, result, counter)."""
    model.zero_grad(set_to_none=True)
    ctx = context(model, batch, special_token_ids=SPECIAL_IDS)
    result = strategy.training_step(ctx)
    return flat_grad(model), result, ctx.counter


def penalty_by_hand(model, batch, mode: str, target: str, epsilon: float) -> torch.Tensor:
    """The penalty at the model's current θ, computed without PerturbationSpace: g from autograd w.r.t. x
    (masked), or w.r.t. the dense V×H embedding weight itself for the matrix."""
    ctx = StepContext(model, batch)
    x = ctx.embed()
    loss = ctx.loss(ctx.forward(x))
    if target == "embedding_output":
        (g,) = torch.autograd.grad(loss, x)
        g = g * batch.attention_mask.unsqueeze(-1)
        norm = g.flatten(1).norm(dim=1)  # per example
    else:
        (g,) = torch.autograd.grad(loss, model.get_input_embeddings().weight)
        norm = g.norm()  # one global norm
    if mode == "exact":
        return 0.5 * epsilon * g.pow(2).sum()
    return epsilon * norm.sum()


def directional_fd(model, batch, fn, direction: list[torch.Tensor], t: float) -> float:
    """Central difference (fn(θ + t·v) − fn(θ − t·v)) / 2t."""
    params = list(model.parameters())
    with torch.no_grad():
        for p, v in zip(params, direction):
            p.add_(v, alpha=t)
    plus = float(fn())
    with torch.no_grad():
        for p, v in zip(params, direction):
            p.add_(v, alpha=-2 * t)
    minus = float(fn())
    with torch.no_grad():
        for p, v in zip(params, direction):
            p.add_(v, alpha=t)
    return (plus - minus) / (2 * t)


@pytest.mark.parametrize("mode", ["exact", "normalized"])
@pytest.mark.parametrize("target", TARGETS)
def test_penalty_gradient_matches_finite_differences(batch, mode, target):
    """(∇θ of the strategy's objective − ∇θL)·v equals d/dt P(θ + t·v) for random directions v, P the
    penalty written out by hand (½ε‖g‖² or ε·Σ‖g_b‖), including the path through the embedding weights."""
    model = model64()
    epsilon = 0.7
    base, _, _ = step(NoRegularizer(NoneConfig()), model, batch)
    total, _, _ = step(GradientPenalty(GradientPenaltyConfig(mode=mode, target=target, epsilon=epsilon)), model, batch)
    contribution = total - base
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in model.parameters()]
        v = torch.cat([d.flatten() for d in direction])
        estimate = directional_fd(
            model, batch, lambda: penalty_by_hand(model, batch, mode, target, epsilon), direction, t=1e-6
        )
        analytic = float(contribution @ v)
        assert abs(analytic - estimate) <= 1e-4 * abs(estimate), (analytic, estimate)


FD_CASES = [("scaled", 1e-3, 1e-3), ("unit", 1e-4, 1e-3), ("scaled", 0.1, 3e-2)]  # (fd_step, h, tolerance)


@pytest.mark.parametrize(("fd_step", "h", "tolerance"), FD_CASES)
@pytest.mark.parametrize("target", TARGETS)
def test_finite_difference_mode_agrees_with_exact(batch, target, fd_step, h, tolerance):
    """float64: the penalty's part of the gradient agrees to 1e-3 (the error is O(h); `scaled`, h = 1e-3:
    measured ≈1e-4 for the output, ≈2e-6 for the matrix, ≈1e-2 at the default h = 0.1). `unit` steps h
    along ĝ, a ~14× longer step than `scaled`'s hε‖g‖ here (‖g‖ ≈ 0.07), hence h = 1e-4 (measured ≈1.5e-4
    and ≈5e-4). The shipped configs' h = 0.1 (`scaled`) is held to 3e-2."""
    model = model64()
    base, _, _ = step(NoRegularizer(NoneConfig()), model, batch)
    exact, exact_result, _ = step(GradientPenalty(GradientPenaltyConfig(target=target)), model, batch)
    fd_config = GradientPenaltyConfig(target=target, mode="finite_difference", h=h, fd_step=fd_step)
    fd, fd_result, _ = step(GradientPenalty(fd_config), model, batch)
    relative_error = float((fd - exact).norm() / (exact - base).norm())
    assert relative_error < tolerance
    assert float(fd_result.metrics["gradient_penalty"]) == pytest.approx(
        float(exact_result.metrics["gradient_penalty"]), rel=1e-6
    )


def test_unit_finite_difference_keeps_earlier_micro_batches_gradients(batch):
    """`fd_step: unit` rescales pass 1's share of `.grad` in place once ‖g‖ is known: gradients already
    accumulated there (earlier micro-batches) must keep weight 1, so two steps add up to twice one step."""
    model = model64()
    strategy = GradientPenalty(GradientPenaltyConfig(mode="finite_difference", h=1e-3, fd_step="unit"))
    once, _, _ = step(strategy, model, batch)
    ctx = StepContext(model, batch, special_token_ids=SPECIAL_IDS)
    strategy.training_step(ctx)  # no zero_grad: accumulates onto `once`
    torch.testing.assert_close(flat_grad(model), 2 * once, rtol=1e-9, atol=1e-12)


def test_finite_difference_reuses_the_dropout_mask(batch):
    """With dropout on, both passes must see the same mask: then FD still matches exact under the same seed
    (a fresh mask for the second pass would add (1/h)·(change of mask) to the gradient)."""
    model = model64(dropout=0.1)
    model.train()
    torch.manual_seed(5)
    exact, _, _ = step(GradientPenalty(GradientPenaltyConfig()), model, batch)
    torch.manual_seed(5)
    base, _, _ = step(NoRegularizer(NoneConfig()), model, batch)
    torch.manual_seed(5)
    fd, _, _ = step(GradientPenalty(GradientPenaltyConfig(mode="finite_difference", h=1e-3)), model, batch)
    assert float((fd - exact).norm() / (exact - base).norm()) < 1e-3


def test_h_one_is_training_on_the_unnormalised_step(batch):
    """h = 1: the update is ∇θL(x + εg) alone, g held constant (the study's eq. 15)."""
    model = model64()
    epsilon = 0.5
    ctx = StepContext(model, batch)
    x = ctx.embed()
    (g,) = torch.autograd.grad(ctx.loss(ctx.forward(x)), x)
    model.zero_grad(set_to_none=True)
    ctx = StepContext(model, batch)
    ctx.loss(ctx.forward(ctx.embed() + epsilon * g * batch.attention_mask.unsqueeze(-1))).backward()
    expected = flat_grad(model)
    strategy = GradientPenalty(GradientPenaltyConfig(mode="finite_difference", h=1.0, epsilon=epsilon))
    actual, _, counter = step(strategy, model, batch)
    # Not bit-equal: PerturbationSpace keeps g in fp32, so the step differs from εg by ~1e-7 relative.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert (counter.forward, counter.backward, counter.double_backward) == (2, 2, 0)


@pytest.mark.parametrize("target", TARGETS)
def test_normalized_is_fgm_adversarial_only_to_first_order(batch, target):
    """For small ε, FGM-L2 (adversarial_only) and `normalized` add the same ε·J ĝ to ∇θL; they differ by O(ε²)."""
    model = model64()
    epsilon = 1e-4
    base, _, _ = step(NoRegularizer(NoneConfig()), model, batch)
    fgm = FGM(FGMConfig(epsilon=epsilon, target=target, combine="adversarial_only"))
    fgm_grad, _, _ = step(fgm, model, batch)
    normalized, _, _ = step(
        GradientPenalty(GradientPenaltyConfig(mode="normalized", target=target, epsilon=epsilon)), model, batch
    )
    assert float((fgm_grad - normalized).norm() / (normalized - base).norm()) < 1e-2


def test_matrix_penalty_is_the_squared_dense_embedding_gradient(batch):
    """‖∇_E L‖² from the used rows equals the squared norm of the dense V×H gradient w.r.t. the weight."""
    model = model64()
    ctx = StepContext(model, batch)
    loss = ctx.loss(ctx.forward())
    (dense,) = torch.autograd.grad(loss, model.get_input_embeddings().weight)
    epsilon = 2.0
    _, result, _ = step(
        GradientPenalty(GradientPenaltyConfig(target="embedding_matrix", epsilon=epsilon)), model, batch
    )
    assert result.metrics["gradient_penalty"] == pytest.approx(0.5 * epsilon * float(dense.pow(2).sum()), rel=1e-6)
    # Repeated tokens share a row: the matrix penalty is not the per-token (embedding_output) one.
    _, per_token, _ = step(GradientPenalty(GradientPenaltyConfig(epsilon=epsilon)), model, batch)
    assert float(per_token.metrics["gradient_penalty"]) != pytest.approx(
        float(result.metrics["gradient_penalty"]), rel=1e-3
    )


def test_pitfall_squaring_plain_grad_is_a_constant(batch):
    """The peer-code pitfall: ‖x.grad‖² after a plain backward has no graph, so adding it changes nothing;
    the exact mode (create_graph) really changes the parameter gradient."""
    model = model64()
    model.zero_grad(set_to_none=True)
    ctx = StepContext(model, batch)
    x = ctx.embed()
    x.retain_grad()
    loss = ctx.loss(ctx.forward(x))
    loss.backward(retain_graph=True)
    pitfall = 0.5 * x.grad.pow(2).sum()
    assert not pitfall.requires_grad and float(pitfall) > 0  # a positive number, but a constant
    model.zero_grad(set_to_none=True)
    (loss + pitfall).backward()
    with_pitfall = flat_grad(model)
    base, _, _ = step(NoRegularizer(NoneConfig()), model, batch)
    assert torch.equal(with_pitfall, base)
    exact, _, _ = step(GradientPenalty(GradientPenaltyConfig()), model, batch)
    assert float((exact - base).norm() / base.norm()) > 1e-2


@pytest.mark.parametrize(
    ("strategy", "double"),
    [
        (GradientPenalty(GradientPenaltyConfig(mode="exact")), True),
        (GradientPenalty(GradientPenaltyConfig(mode="normalized")), True),
        (GradientPenalty(GradientPenaltyConfig(mode="finite_difference")), False),
        (JacobianPenalty(JacobianPenaltyConfig()), True),
        (Consistency(ConsistencyConfig()), False),
    ],
)
def test_eager_attention_only_when_a_double_backward_is_needed(strategy, double):
    assert strategy.needs_double_backward is double
    assert attention_for(ModelConfig(), strategy.needs_double_backward) == ("eager" if double else "sdpa")


@pytest.mark.parametrize("mode", ["exact", "normalized", "finite_difference"])
@pytest.mark.parametrize("target", TARGETS)
def test_cost_is_what_the_counter_counts(batch, mode, target):
    strategy = GradientPenalty(GradientPenaltyConfig(mode=mode, target=target))
    ctx = make_ctx(tiny_bert(4, hidden=16, layers=1), batch)
    strategy.training_step(ctx)
    cost = strategy.cost()
    assert (ctx.counter.forward, ctx.counter.backward) == (cost.forward, cost.backward)
    assert (ctx.counter.double_backward > 0) is cost.double_backward


def test_finite_difference_runs_with_sdpa(batch):
    """No double backward: the SDPA model gives the eager model's finite-difference gradient."""
    config = GradientPenaltyConfig(mode="finite_difference")
    eager, _, _ = step(GradientPenalty(config), model64(attn="eager"), batch)
    sdpa, _, counter = step(GradientPenalty(config), model64(attn="sdpa"), batch)
    torch.testing.assert_close(sdpa, eager, rtol=1e-7, atol=1e-10)
    # On the CPU SDPA happens to support double backward, so agreement alone would not show its absence.
    assert counter.double_backward == 0


def window_share_by_hand(model, batch, mode: str, target: str, epsilon: float, share: float) -> torch.Tensor:
    """∇θ of a micro-batch's part of its window's objective, share·L + P(share·g) (StepContext: the penalty is on
    the window's gradient, which is share·g on this micro-batch's x), by plain autograd without PerturbationSpace:
    g w.r.t. x (masked) or the dense V×H embedding weight; P = ½ε‖·‖², or ε·Σ of per-example norms (one norm for
    the matrix)."""
    model.zero_grad(set_to_none=True)
    ctx = StepContext(model, batch)
    x = ctx.embed()
    loss = ctx.loss(ctx.forward(x))
    if target == "embedding_output":
        (g,) = torch.autograd.grad(loss, x, create_graph=True)
        g = share * g * batch.attention_mask.unsqueeze(-1)
        norm = g.flatten(1).norm(dim=1).sum()
    else:
        (g,) = torch.autograd.grad(loss, model.get_input_embeddings().weight, create_graph=True)
        g = share * g
        norm = g.norm()
    penalty = epsilon * norm if mode == "normalized" else 0.5 * epsilon * g.pow(2).sum()
    (share * loss + penalty).backward()
    return flat_grad(model)


# (mode, fd_step, h, tolerance on the penalty's part): the finite differences agree to O(h), as in FD_CASES
SHARE_CASES = [
    ("exact", "scaled", 0.1, 1e-9),
    ("normalized", "scaled", 0.1, 1e-9),
    ("finite_difference", "scaled", 1e-3, 1e-3),
    ("finite_difference", "unit", 1e-4, 1e-3),
]


@pytest.mark.parametrize(("mode", "fd_step", "h", "tolerance"), SHARE_CASES)
@pytest.mark.parametrize("target", TARGETS)
def test_a_micro_batch_penalises_the_window_gradient(batch, target, mode, fd_step, h, tolerance):
    """Gradient accumulation, loss_scale s = a micro-batch's share of its window: the step leaves ∇θ of
    s·L + P(s·g), the window's penalty on the window's gradient (so ½ε‖g‖² weighs ε·s, and ε‖g‖ keeps ε): not
    s·(L + P(g)), which made ½ε‖g‖² K times stronger with K micro-batches. For `fd_step: unit` this pins c =
    ε·s‖g‖/h, g being x.grad divided by s: without that division c would be ε·s²‖g‖/h."""
    share, epsilon = 0.25, 2.0
    model = model64()
    config = GradientPenaltyConfig(target=target, epsilon=epsilon, mode=mode, h=h, fd_step=fd_step)
    model.zero_grad(set_to_none=True)
    GradientPenalty(config).training_step(StepContext(model, batch, loss_scale=share, special_token_ids=SPECIAL_IDS))
    got = flat_grad(model)
    model.zero_grad(set_to_none=True)
    NoRegularizer(NoneConfig()).training_step(StepContext(model, batch, loss_scale=share))
    clean = flat_grad(model)
    want = window_share_by_hand(model, batch, "normalized" if mode == "normalized" else "exact", target, epsilon, share)
    assert float((got - want).norm() / (want - clean).norm()) < tolerance
    assert float((want - clean).norm()) > 1e-3 * float(clean.norm())  # the penalty's part is not negligible
