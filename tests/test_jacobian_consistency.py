"""Random-sign Jacobian estimator and consistency training: unbiasedness, divergences, gradients."""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch
from conftest import SENTENCES, make_ctx, tiny_bert

from clue_adv.regularizers.base import Batch, StepContext
from clue_adv.regularizers.consistency import Consistency, ConsistencyConfig, divergence
from clue_adv.regularizers.jacobian_penalty import (
    JacobianPenalty,
    JacobianPenaltyConfig,
    jacobian_estimate,
    rademacher_signs,
    signed_output_gradient,
)
from clue_adv.regularizers.none import NoneConfig, NoRegularizer
from clue_adv.regularizers.perturb import PerturbationSpace

CLASSES = 3


def small_model(dtype=torch.float64, dropout: float = 0.0) -> torch.nn.Module:
    return tiny_bert(CLASSES, hidden=8, layers=1, dtype=dtype, dropout=dropout)


def encode(tokenizer, sentences: list[str], labels: list[int]) -> Batch:
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    enc["labels"] = torch.tensor(labels)
    return Batch.from_mapping(dict(enc), torch.device("cpu"))


def copies(tokenizer, n: int) -> Batch:
    """n copies of one title (no padding): a batch of n independent draws for one example."""
    return encode(tokenizer, [SENTENCES[0]] * n, [1] * n)


def exact_jacobian_terms(ctx: StepContext, space: PerturbationSpace) -> float:
    """Σ_{b,i} ‖∇f_{bi}‖², one backward per example and class."""
    x = ctx.embed()
    probs = torch.softmax(ctx.forward(x), dim=-1)
    total = 0.0
    for b, i in itertools.product(range(probs.shape[0]), range(probs.shape[1])):
        (g,) = torch.autograd.grad(probs[b, i], x, retain_graph=True)
        total += float(space.squared_norm_sum(space.from_x_grad(g)))
    return total


# -- Rademacher estimator -------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["embedding_output", "embedding_matrix"])
def test_rademacher_expectation_by_enumerating_every_sign_vector(tokenizer, target):
    """Averaging ‖∇ Σ η·f‖² over all 2^(B·C) sign vectors gives exactly Σ_{b,i}‖∇f_{bi}‖² (cross terms cancel;
    for the matrix target also across examples that share rows)."""
    model = small_model()
    batch = encode(tokenizer, SENTENCES[1:3], [0, 2])  # two titles of different lengths: padding
    ctx = StepContext(model, batch)
    space = PerturbationSpace(ctx, target)
    exact = exact_jacobian_terms(ctx, space)
    x = ctx.embed()
    probs = torch.softmax(ctx.forward(x), dim=-1)
    values = []
    for signs in itertools.product((-1.0, 1.0), repeat=probs.numel()):
        eta = torch.tensor(signs, dtype=probs.dtype).view_as(probs)
        values.append(float(space.squared_norm_sum(signed_output_gradient(ctx, space, x, probs, eta).detach())))
    assert sum(values) / len(values) == pytest.approx(exact, rel=1e-6)  # fp32 g in PerturbationSpace
    assert min(values) < 0.5 * exact  # single draws really do vary: the agreement is not trivial


def test_rademacher_sample_mean_matches_exact_sum(tokenizer):
    """jacobian_estimate over 2000 copies × 2 samples = 4000 random draws: within 5 standard errors (the exact
    variance of one draw is 4·Σ_{i<j}(∇fᵢ·∇fⱼ)², from the same per-class gradients)."""
    model = small_model()
    single = StepContext(model, copies(tokenizer, 1))
    x = single.embed()
    probs = torch.softmax(single.forward(x), dim=-1)
    jac = torch.stack([torch.autograd.grad(probs[0, i], x, retain_graph=True)[0].flatten() for i in range(CLASSES)])
    gram = jac @ jac.T
    exact = float(gram.trace())
    variance = 4 * float(gram.triu(diagonal=1).pow(2).sum())

    n, samples = 2000, 2
    ctx = StepContext(model, copies(tokenizer, n))
    space = PerturbationSpace(ctx, "embedding_output")
    x = ctx.embed()
    probs = torch.softmax(ctx.forward(x), dim=-1)
    torch.manual_seed(0)
    estimate = float(jacobian_estimate(ctx, space, x, probs, samples).detach())
    standard_error = math.sqrt(variance / (n * samples))
    assert abs(estimate - exact) < 5 * standard_error
    assert 5 * standard_error < 0.25 * exact  # tight enough to catch a lost factor or {0, 1} signs
    assert ctx.counter.backward == samples


def test_jacobian_penalty_gradient_matches_finite_differences(batch):
    """The double backward: for fixed signs (same seed), ∇θ of λ·estimate matches a central difference."""
    model = tiny_bert(4, hidden=16, layers=1, dtype=torch.float64, dropout=0.0)
    weight = 3.0
    strategy = JacobianPenalty(JacobianPenaltyConfig(weight=weight, samples=2))

    def grads(s) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        s.training_step(StepContext(model, batch))
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    contribution = grads(strategy) - grads(NoRegularizer(NoneConfig()))

    def penalty() -> float:
        # By hand in float64 (PerturbationSpace keeps g in fp32, whose rounding 1/t would amplify).
        ctx = StepContext(model, batch)
        x = ctx.embed()
        probs = torch.softmax(ctx.forward(x), dim=-1)
        torch.manual_seed(7)
        total = 0.0
        for _ in range(2):
            eta = rademacher_signs(probs.shape, probs.device).to(probs.dtype)
            (g,) = torch.autograd.grad((eta * probs).sum(), x, retain_graph=True)
            total += float((g * batch.attention_mask.unsqueeze(-1)).pow(2).sum())
        return weight * total / (2 * batch.size)

    params = list(model.parameters())
    direction = [torch.randn(p.shape, generator=torch.Generator().manual_seed(3), dtype=p.dtype) for p in params]
    t = 1e-6
    with torch.no_grad():
        for p, v in zip(params, direction):
            p.add_(v, alpha=t)
    plus = penalty()
    with torch.no_grad():
        for p, v in zip(params, direction):
            p.add_(v, alpha=-2 * t)
    minus = penalty()
    with torch.no_grad():
        for p, v in zip(params, direction):
            p.add_(v, alpha=t)
    estimate = (plus - minus) / (2 * t)
    analytic = float(contribution @ torch.cat([v.flatten() for v in direction]))
    assert analytic == pytest.approx(estimate, rel=1e-4)


# -- consistency ----------------------------------------------------------------------------------------
# Hand-computed for p = (0.7, 0.2, 0.1) (second pass) and q = (0.5, 0.3, 0.2) (first pass):
# KL(p‖q) = 0.7·ln 1.4 + 0.2·ln(2/3) + 0.1·ln 0.5 = 0.2355306 − 0.0810930 − 0.0693147 = 0.0851229
# KL(q‖p) = 0.5·ln(5/7) + 0.3·ln 1.5 + 0.2·ln 2 = −0.1682361 + 0.1216395 + 0.1386294 = 0.0920328
# ‖p − q‖² = 0.04 + 0.01 + 0.01 = 0.06
@pytest.mark.parametrize(
    ("kind", "expected"), [("mse", 0.06), ("kl", 0.0920328), ("sym_kl", 0.5 * (0.0851229 + 0.0920328))]
)
def test_divergences_by_hand(kind, expected):
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.3, 0.2]], dtype=torch.float64)
    # Logits are defined up to a constant: shifting one must not change anything.
    value = divergence(kind, p.log() + 3.0, q.log())
    assert value.shape == (1,)
    assert float(value) == pytest.approx(expected, abs=2e-7)


@pytest.mark.parametrize("kind", ["mse", "kl", "sym_kl"])
def test_consistency_is_zero_for_identical_passes(batch, kind):
    """σ = 0 and no dropout (eval mode): both halves are the same function of the same input, so d = 0 and the
    gradient is the plain CE gradient."""
    model = tiny_bert(4, hidden=16, layers=1, dropout=0.1).eval()
    model.zero_grad(set_to_none=True)
    result = Consistency(ConsistencyConfig(divergence=kind, sigma=0.0)).training_step(make_ctx(model, batch))
    assert result.metrics["divergence"] <= 1e-12
    regularized = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    NoRegularizer(NoneConfig()).training_step(make_ctx(model, batch))
    for got, want in zip(regularized, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_dropout_alone_makes_the_passes_differ(batch):
    model = tiny_bert(4, hidden=16, layers=1, dropout=0.1).train()
    result = Consistency(ConsistencyConfig(sigma=0.0)).training_step(make_ctx(model, batch))
    assert result.metrics["divergence"] > 1e-8


@pytest.mark.parametrize("stop", [True, False])
def test_stop_gradient_clean_blocks_the_divergence_gradient(batch, stop):
    """The gradient reaching the first pass's logits is the CE gradient alone when the clean branch is stopped."""
    model = tiny_bert(4, hidden=16, layers=1, dropout=0.0)
    captured = []

    def keep_logits_grad(_module, _inputs, logits):
        logits.register_hook(captured.append)

    handle = model.classifier.register_forward_hook(keep_logits_grad)
    ctx = make_ctx(model, batch)
    Consistency(ConsistencyConfig(sigma=0.05, weight=10.0, stop_gradient_clean=stop)).training_step(ctx)
    handle.remove()
    (logits_grad,) = captured
    clean = logits_grad[: batch.size]
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids
        ).logits
    ce_grad = (torch.softmax(logits, -1) - torch.nn.functional.one_hot(batch.labels, 4)) / batch.size
    if stop:
        torch.testing.assert_close(clean, ce_grad, rtol=1e-4, atol=1e-7)
    else:
        assert float((clean - ce_grad).abs().max()) > 1e-4
    assert float(logits_grad[batch.size :].abs().max()) > 0  # the noisy pass always gets the divergence gradient


def test_ce_on_both_averages_the_two_cross_entropies(batch):
    """R-Drop's task loss ½(CE₁ + CE₂): with λ = 0 each half's logits get half its own CE gradient."""
    model = tiny_bert(4, hidden=16, layers=1, dropout=0.0)
    captured = []

    def keep_logits(_module, _inputs, logits):
        captured.append(logits)
        logits.retain_grad()

    handle = model.classifier.register_forward_hook(keep_logits)
    ctx = make_ctx(model, batch)
    torch.manual_seed(0)
    Consistency(ConsistencyConfig(sigma=0.05, weight=0.0, ce_on_both=True)).training_step(ctx)
    handle.remove()
    (logits,) = captured
    onehot = torch.nn.functional.one_hot(batch.labels, 4).repeat(2, 1)
    expected = 0.5 * (torch.softmax(logits.detach(), -1) - onehot) / batch.size
    torch.testing.assert_close(logits.grad, expected, rtol=1e-4, atol=1e-8)


def test_doubled_batch_shares_the_step_precision_and_counter(batch):
    """The 2B forward runs under the run's autocast context and counts on the step's own counter."""
    entered = []

    @contextlib.contextmanager
    def tracking_autocast():
        entered.append(True)
        yield

    ctx = make_ctx(tiny_bert(4, hidden=16, layers=1), batch, autocast=tracking_autocast)
    Consistency(ConsistencyConfig()).training_step(ctx)
    assert entered == [True]
    assert ctx.counter.forward == 1


def test_mse_consistency_approximates_sigma_squared_jacobian(tokenizer):
    """The study's eq. 8: for small σ, E‖f(x + σξ) − f(x)‖² ≈ σ²·Σᵢ‖∇ₓfᵢ‖² (2000 noise draws, 10%)."""
    model = small_model()
    single = StepContext(model, copies(tokenizer, 1))
    exact = exact_jacobian_terms(single, PerturbationSpace(single, "embedding_output"))
    sigma = 2e-3
    torch.manual_seed(0)
    ctx = make_ctx(model, copies(tokenizer, 2000))
    result = Consistency(ConsistencyConfig(divergence="mse", sigma=sigma)).training_step(ctx)
    assert result.metrics["divergence"] == pytest.approx(sigma**2 * exact, rel=0.1)


@pytest.mark.parametrize(
    "strategy",
    [
        JacobianPenalty(JacobianPenaltyConfig(samples=3)),
        JacobianPenalty(JacobianPenaltyConfig(target="embedding_matrix")),
        Consistency(ConsistencyConfig(sigma=0.1, ce_on_both=True)),
        Consistency(ConsistencyConfig(sigma=0.1, target="embedding_matrix")),
        Consistency(ConsistencyConfig(sigma=0.1, same_dropout_mask=True)),
    ],
)
def test_cost_is_what_the_counter_counts(batch, strategy):
    ctx = make_ctx(tiny_bert(4, hidden=16, layers=1), batch)
    strategy.training_step(ctx)
    cost = strategy.cost()
    assert (ctx.counter.forward, ctx.counter.backward) == (cost.forward, cost.backward)
    assert (ctx.counter.double_backward > 0) is cost.double_backward


def test_consistency_matrix_target_matches_a_hand_computed_gradient(batch):
    """target embedding_matrix: the second pass sees E + N (one seeded draw per used row); the gradient is that
    of CE(f_E) + λ·mse(f_{E+N}, f_E) computed by hand, and E is bit-exact after the step."""
    model = tiny_bert(4, hidden=16, layers=1, dropout=0.0, dtype=torch.float64)
    sigma, weight = 0.3, 2.0
    embedding = model.get_input_embeddings().weight
    before = embedding.detach().clone()
    rows = torch.unique(batch.input_ids[batch.attention_mask.bool()])
    torch.manual_seed(3)
    draw = torch.randn(len(rows), 16) * sigma

    def logits_with(w: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.embedding(batch.input_ids, w)
        return model(inputs_embeds=x, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids).logits

    model.zero_grad(set_to_none=True)
    clean = logits_with(embedding)
    noisy = logits_with(embedding + torch.zeros_like(before).index_add(0, rows, draw.to(before.dtype)))
    loss = torch.nn.functional.cross_entropy(clean, batch.labels) + weight * divergence("mse", noisy, clean).mean()
    loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    config = ConsistencyConfig(sigma=sigma, weight=weight, divergence="mse", target="embedding_matrix")
    Consistency(config).training_step(make_ctx(model, batch))
    assert torch.equal(embedding.detach(), before)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("same", [True, False])
def test_same_dropout_mask_leaves_only_the_noise(batch, same):
    """σ = 0, train mode with dropout: one shared mask makes the passes identical (d exactly 0); separate masks
    make them differ."""
    model = tiny_bert(4, hidden=16, layers=1, dropout=0.1).train()
    result = Consistency(ConsistencyConfig(sigma=0.0, same_dropout_mask=same)).training_step(make_ctx(model, batch))
    if same:
        assert result.metrics["divergence"] == 0.0
    else:
        assert result.metrics["divergence"] > 1e-8


def test_same_dropout_mask_with_noise_still_measures_the_noise(batch):
    model = tiny_bert(4, hidden=16, layers=1, dropout=0.1).train()
    config = ConsistencyConfig(sigma=0.1, same_dropout_mask=True)
    assert Consistency(config).training_step(make_ctx(model, batch)).metrics["divergence"] > 1e-8


def test_stacked_consistency_declares_its_doubled_batch():
    """One pass on 2B examples: counted once, worth two passes at batch B (what the benchmark measures)."""
    stacked = Consistency(ConsistencyConfig()).cost()
    assert (stacked.forward, stacked.backward, stacked.batch_factor) == (1, 1, 2)
    assert (stacked.forward_at_batch, stacked.backward_at_batch) == (2, 2)
    shared = Consistency(ConsistencyConfig(same_dropout_mask=True)).cost()
    assert (shared.forward_at_batch, shared.backward_at_batch) == (2, 1)
