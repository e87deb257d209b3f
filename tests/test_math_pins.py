"""Mathematics pinned against hand computations on a model whose loss is a known function of x.

`Bag` sums the word-embedding output over ALL positions, padding included, s_i = Σ_t x_it, and applies a
quadratic layer: logits_i = W·s_i + V·(s_i ⊙ s_i) + b. So ∇ₓL is known in closed form, (W + 2V·diag(s))ᵀ(p − y)/B
at every position, and, unlike BERT, whose [CLS] never attends to padding (∇ₓL is exactly 0 there), it is as
large at padding as at real tokens: a dropped padding mask anywhere in a strategy changes the numbers below. The
quadratic term lets the gradient's signs flip as s moves, so sign/L∞ ascent directions change between steps.
Every expected value is computed here in float64 from the formulas (softmax, KL, the projections), with no
autograd and no PerturbationSpace.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_ctx

from clue_adv.regularizers.base import Batch
from clue_adv.regularizers.consistency import Consistency, ConsistencyConfig
from clue_adv.regularizers.gradient_penalty import GradientPenalty, GradientPenaltyConfig
from clue_adv.regularizers.pgd import PGD, PGDConfig
from clue_adv.regularizers.smart import SMART, SMARTConfig, symmetric_kl
from clue_adv.regularizers.vat import VAT, VATConfig, kl_divergence

F64 = torch.float64


class Bag(torch.nn.Module):
    """logits = W·s + V·(s ⊙ s) + b, s = Σ_t x_t over every position (padding too), in float64."""

    def __init__(self, vocab: int = 10, hidden: int = 4, classes: int = 4, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embedding = torch.nn.Embedding(vocab, hidden, dtype=F64)
        with torch.no_grad():
            self.embedding.weight.copy_(0.5 * torch.randn(vocab, hidden, generator=gen, dtype=F64))
        self.weight = torch.nn.Parameter(torch.randn(classes, hidden, generator=gen, dtype=F64))
        self.quadratic = torch.nn.Parameter(0.5 * torch.randn(classes, hidden, generator=gen, dtype=F64))
        self.bias = torch.nn.Parameter(0.1 * torch.randn(classes, generator=gen, dtype=F64))

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embedding

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, token_type_ids=None):
        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        s = inputs_embeds.sum(1)
        return SimpleNamespace(logits=s @ self.weight.T + (s * s) @ self.quadratic.T + self.bias)


def bag_batch() -> Batch:
    """Three examples of 5, 3 and 2 real tokens (id 0 is padding); ids repeat within and across examples."""
    ids = torch.tensor([[1, 4, 5, 4, 2], [1, 6, 2, 0, 0], [1, 2, 0, 0, 0]])
    return Batch(input_ids=ids, attention_mask=(ids != 0).long(), labels=torch.tensor([0, 2, 3]))


class Hand:
    """The model's quantities by formula. A perturbation is given as its per-example sum over real tokens."""

    def __init__(self, model: Bag, batch: Batch) -> None:
        self.ids = batch.input_ids
        self.m = batch.attention_mask.to(F64)  # B×T
        self.W = model.weight.detach()
        self.V = model.quadratic.detach()
        self.b = model.bias.detach()
        self.E = model.embedding.weight.detach()
        self.s = self.E[self.ids].sum(1)  # Σ_t x_t over every position, padding included
        self.y = torch.nn.functional.one_hot(batch.labels, self.W.shape[0]).to(F64)
        self.B = len(self.ids)

    def logits(self, shift: torch.Tensor) -> torch.Tensor:
        s = self.s + shift
        return s @ self.W.T + (s * s) @ self.V.T + self.b

    def grad_shift(self, shift: torch.Tensor, grad_logits: torch.Tensor) -> torch.Tensor:
        """Chain rule through the layer: ∂/∂s of Σ grad_logits·logits(s) = (W + 2V·diag(s))ᵀ grad_logits (B×H)."""
        return grad_logits @ self.W + 2 * (self.s + shift) * (grad_logits @ self.V)

    def ce_grad_shift(self, shift: torch.Tensor) -> torch.Tensor:
        """∇ of the batch-mean cross-entropy with respect to each example's shift of s."""
        return self.grad_shift(shift, (softmax(self.logits(shift)) - self.y) / self.B)

    def shift_output(self, r: torch.Tensor) -> torch.Tensor:
        """Σ_t over real tokens of a B×T×H perturbation (padding entries of r never reach the model)."""
        return (r * self.m[..., None]).sum(1)

    def to_positions(self, u: torch.Tensor) -> torch.Tensor:
        """A per-example vector u (B×H) placed on every real token, 0 on padding: ∇ wrt a B×T×H perturbation."""
        return self.m[..., None] * u[:, None, :]


def softmax(z: torch.Tensor) -> torch.Tensor:
    e = (z - z.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row, from probabilities."""
    return (p * (p.log() - q.log())).sum(-1)


def per_example_l2(r: torch.Tensor) -> torch.Tensor:
    return r.flatten(1).norm(dim=1).view(-1, 1, 1)


# -- KL values by formula --------------------------------------------------------------------------------
# p = (0.7, 0.2, 0.1), q = (0.5, 0.3, 0.2):
# KL(p‖q) = 0.7·ln 1.4 + 0.2·ln(2/3) + 0.1·ln 0.5 = 0.2355306 − 0.0810930 − 0.0693147 = 0.0851229
# KL(q‖p) = 0.5·ln(5/7) + 0.3·ln 1.5 + 0.2·ln 2 = −0.1682361 + 0.1216395 + 0.1386294 = 0.0920328
# With the rows swapped in a second example the batch mean of either direction is (0.0851229 + 0.0920328)/2, so
# the one-row batch pins the direction and the two-row batch pins the batch mean.
def test_kl_divergence_is_kl_of_the_first_argument_to_the_second():
    p = torch.tensor([[0.7, 0.2, 0.1]], dtype=F64)
    q = torch.tensor([[0.5, 0.3, 0.2]], dtype=F64)
    assert float(kl_divergence(p.log() + 2.0, q.log())) == pytest.approx(0.0851229, abs=2e-7)
    assert float(kl_divergence(q.log(), p.log() - 1.0)) == pytest.approx(0.0920328, abs=2e-7)
    two = kl_divergence(torch.cat([p, q]).log(), torch.cat([q, 0.5 * p]).log())  # logits up to a constant
    assert float(two) == pytest.approx(0.5 * (0.0851229 + 0.0920328), abs=2e-7)
    assert float(symmetric_kl(p.log(), q.log())) == pytest.approx(0.0851229 + 0.0920328, abs=2e-7)


# -- PGD: iterates for K ≥ 2 ------------------------------------------------------------------------------
def hand_pgd(model: Bag, batch: Batch, *, epsilon: float, alpha: float, steps: int, norm: str, target: str):
    """r₀ = 0, r_{k+1} = Π_ε(r_k + α·ĝ(r_k)), the gradient recomputed at every iterate from CE's closed form."""
    h = Hand(model, batch)
    if target == "embedding_output":
        r = torch.zeros(*h.ids.shape, h.W.shape[1], dtype=F64)
        shift = h.shift_output

        def grad(r):
            return h.to_positions(h.ce_grad_shift(shift(r)))

        def l2_unit(v):
            return v / per_example_l2(v)

        def l2_project(r):
            return r * (epsilon / per_example_l2(r)).clamp(max=1.0)
    else:
        rows = torch.unique(h.ids[h.m.bool()])  # the used rows, sorted, as the target space orders them
        counts = ((h.ids[..., None] == rows) * h.m[..., None]).sum(1)  # B×rows: real occurrences of each row
        r = torch.zeros(len(rows), h.W.shape[1], dtype=F64)

        def shift(r):
            return counts @ r

        def grad(r):
            return counts.T @ h.ce_grad_shift(shift(r))

        def l2_unit(v):
            return v / v.norm()

        def l2_project(r):
            return r * min(1.0, epsilon / float(r.norm()))

    iterates, directions = [r], []
    for _ in range(steps):
        g = grad(r)
        directions.append(l2_unit(g) if norm == "l2" else torch.sign(g))
        stepped = r + alpha * directions[-1]
        r = l2_project(stepped) if norm == "l2" else stepped.clamp(-epsilon, epsilon)
        iterates.append(r)
    return iterates, directions


@pytest.mark.parametrize("target", ["embedding_output", "embedding_matrix"])
@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_pgd_iterates_equal_the_hand_computation(target, norm):
    """Every iterate r₁ … r₃ of PGD, the ascent direction recomputed at x + r_k each step (a PGD that kept the
    first, clean direction, or spent part of its ball on padding, differs from these)."""
    epsilon, alpha, steps = (1.0, 0.6, 3) if norm == "l2" else (0.4, 0.25, 3)
    model, batch = Bag(), bag_batch()
    pgd = PGD(PGDConfig(steps=steps, epsilon=epsilon, alpha=alpha, norm=norm, target=target))
    pgd.keep_iterates = True
    pgd.training_step(make_ctx(model, batch))
    expected, directions = hand_pgd(model, batch, epsilon=epsilon, alpha=alpha, steps=steps, norm=norm, target=target)
    # not vacuous: the direction really turns between steps, and the projection is active at the end
    assert not torch.allclose(directions[0], directions[1], atol=1e-3)
    assert not torch.allclose(directions[1], directions[2], atol=1e-3)
    final = expected[-1]
    if norm == "l2":
        sizes = final.flatten(1).norm(dim=1) if target == "embedding_output" else final.norm()
        torch.testing.assert_close(sizes, torch.full_like(sizes, epsilon))
    else:
        assert bool((final.abs() == epsilon).any())
    assert len(pgd.iterates) == steps + 1
    for got, want in zip(pgd.iterates, expected, strict=True):
        torch.testing.assert_close(got.to(F64), want, rtol=1e-9, atol=1e-12)


# -- SMART: per-example L∞ ascent ---------------------------------------------------------------------------
def test_smart_iterates_equal_the_hand_computation():
    """r₀ ~ σ·N(0, I) on real tokens, then r ← clamp(r + η·g/‖g‖_∞, ±ε) with ‖g‖_∞ PER EXAMPLE, g the gradient of
    the symmetric KL ℓ_s = (P − Q)·(a − b) (a, b the noisy and clean logits): ∂ℓ_s/∂a = P⊙(a − b) − P·(P·(a − b))
    + (P − Q). With a global ‖g‖_∞ every example but the steepest one would take a shorter step."""
    epsilon, step, sigma, iterations, seed = 0.3, 0.1, 0.1, 3, 0
    model, batch = Bag(), bag_batch()
    smart = SMART(SMARTConfig(epsilon=epsilon, step_size=step, noise_std=sigma, iterations=iterations, mu=0.0))
    smart.keep_iterates = True
    torch.manual_seed(seed)
    smart.training_step(make_ctx(model, batch))

    h = Hand(model, batch)
    torch.manual_seed(seed)  # SMART draws r₀ before anything else, in fp32
    r = (torch.randn(*h.ids.shape, h.W.shape[1]) * sigma * h.m[..., None].float()).to(F64)
    clean = h.logits(torch.zeros_like(h.s))
    expected, gradient_sizes = [r], []
    for _ in range(iterations):
        noisy = h.logits(h.shift_output(r))
        p, q, diff = softmax(noisy), softmax(clean), noisy - clean
        grad_noisy = (p * diff - p * (p * diff).sum(-1, keepdim=True) + p - q) / h.B
        g = h.to_positions(h.grad_shift(h.shift_output(r), grad_noisy))
        sizes = g.flatten(1).abs().amax(dim=1)
        gradient_sizes.append(sizes)
        r = (r + step * g / sizes.view(-1, 1, 1)).clamp(-epsilon, epsilon)
        expected.append(r)
    # not vacuous: the examples' gradients differ in size, and the projection is active at the end
    assert all(float(s.max() / s.min()) > 1.5 for s in gradient_sizes)
    assert bool((expected[-1].abs() == epsilon).any())
    assert len(smart.iterates) == iterations + 1
    for got, want in zip(smart.iterates, expected, strict=True):
        torch.testing.assert_close(got.to(F64), want, rtol=1e-5, atol=1e-6)


# -- VAT: the power-iteration direction and the KL it trains on -------------------------------------------
def test_vat_direction_and_kl_equal_the_hand_computation():
    """d₀ the Gaussian start normalised per example; d₁ ∥ ∇_d KL(p ‖ q(ξ·d₀)) = (W + 2V·diag(s))ᵀ(q − p) on every
    real token (exact for any ξ, since ∂KL(p‖softmax(a))/∂a = softmax(a) − p); r = ε·d̂₁ and the logged KL is
    KL(p ‖ q(r)). ξ and ε are large here, so KL(q ‖ p) (the arguments swapped) gives another direction and value."""
    epsilon, xi, seed = 0.8, 0.5, 0
    model, batch = Bag(), bag_batch()
    vat = VAT(VATConfig(epsilon=epsilon, xi=xi, iterations=1, alpha=1.0))
    vat.keep_iterates = True
    torch.manual_seed(seed)
    result = vat.training_step(make_ctx(model, batch))

    h = Hand(model, batch)
    torch.manual_seed(seed)  # VAT draws its start before anything else, in fp32
    start = (torch.randn(*h.ids.shape, h.W.shape[1]) * h.m[..., None].float()).to(F64)
    d0 = start / per_example_l2(start)
    p = softmax(h.logits(torch.zeros_like(h.s)))
    probe = h.shift_output(xi * d0)
    g = h.to_positions(h.grad_shift(probe, (softmax(h.logits(probe)) - p) / h.B))
    d1 = g / per_example_l2(g)
    kl_at_r = kl(p, softmax(h.logits(h.shift_output(epsilon * d1)))).mean()

    start_got, direction_got = vat.iterates
    torch.testing.assert_close(start_got.to(F64), d0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(direction_got.to(F64), d1, rtol=1e-4, atol=1e-5)  # d is fp32
    assert result.metrics["kl"] == pytest.approx(float(kl_at_r), rel=1e-5)
    # the swapped divergence would differ by far more than those tolerances
    q_probe = softmax(h.logits(probe))
    reverse = (q_probe * (q_probe.log() - p.log())).sum(-1, keepdim=True)
    g_reverse = h.to_positions(h.grad_shift(probe, q_probe * (q_probe.log() - p.log()) - q_probe * reverse))
    assert float((g_reverse / per_example_l2(g_reverse) - d1).abs().max()) > 1e-2
    q_r = softmax(h.logits(h.shift_output(epsilon * d1)))
    assert abs(float(kl(q_r, p).mean() / kl_at_r) - 1) > 1e-2


# -- consistency: which pass is the reference of the KL ----------------------------------------------------
def hand_param_grads(h: Hand, passes: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """∇θ of Σ over passes of δ·logits(shift), δ (B×C) the loss's gradient with respect to that pass's logits:
    W gets δᵀs, V gets δᵀ(s ⊙ s), b gets Σδ, and every position t of example i (padding too: s sums them all)
    adds (W + 2V·diag(s_i))ᵀδ_i to the embedding row of its token."""
    grads = {
        "weight": torch.zeros_like(h.W),
        "quadratic": torch.zeros_like(h.V),
        "bias": torch.zeros_like(h.b),
        "embedding.weight": torch.zeros_like(h.E),
    }
    for shift, delta in passes:
        s = h.s + shift
        grads["weight"] += delta.T @ s
        grads["quadratic"] += delta.T @ (s * s)
        grads["bias"] += delta.sum(0)
        per_position = h.grad_shift(shift, delta)[:, None, :].expand(*h.ids.shape, -1)
        grads["embedding.weight"].index_add_(0, h.ids.flatten(), per_position.reshape(-1, h.E.shape[1]))
    return grads


@pytest.mark.parametrize("stop_gradient_clean", [True, False])
def test_consistency_kl_is_kl_of_the_clean_pass_to_the_noisy_one(stop_gradient_clean):
    """`divergence: kl` is KL(q ‖ p), q = f(x) (clean), p = f(x + σ·N(0, I)): its value, and the parameter
    gradient of CE(q) + λ·KL(q ‖ p) from ∂/∂a KL(q‖softmax(a)) = p − q (noisy logits a) and, without the stop
    gradient, ∂/∂b KL(softmax(b)‖p) = q⊙(log q − log p) − q·KL(q‖p) (clean logits b)."""
    sigma, weight, seed = 0.3, 2.0, 0
    model, batch = Bag(), bag_batch()
    config = ConsistencyConfig(divergence="kl", sigma=sigma, weight=weight, stop_gradient_clean=stop_gradient_clean)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    result = Consistency(config).training_step(make_ctx(model, batch))
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    h = Hand(model, batch)
    torch.manual_seed(seed)  # the noise is the step's only random draw (the model has no dropout), in fp32
    noise = h.shift_output((torch.randn(*h.ids.shape, h.W.shape[1]) * sigma * h.m[..., None].float()).to(F64))
    zero = torch.zeros_like(h.s)
    q, p = softmax(h.logits(zero)), softmax(h.logits(noise))
    divergences = kl(q, p)
    assert result.metrics["divergence"] == pytest.approx(float(divergences.mean()), rel=1e-9)
    assert abs(float(kl(p, q).mean() / divergences.mean()) - 1) > 1e-2  # the other direction is another number
    clean_delta = (q - h.y) / h.B
    if not stop_gradient_clean:
        clean_delta = clean_delta + weight * (q * (q.log() - p.log()) - q * divergences[:, None]) / h.B
    expected = hand_param_grads(h, [(zero, clean_delta), (noise, weight * (p - q) / h.B)])
    for name, want in expected.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-9, atol=1e-12, msg=name)


# -- gradient penalty: the norm counts real tokens only -----------------------------------------------------
@pytest.mark.parametrize("target", ["embedding_output", "embedding_matrix"])
@pytest.mark.parametrize("mode", ["exact", "normalized", "finite_difference"])
def test_gradient_penalty_value_equals_the_hand_computation(target, mode):
    """½ε‖g‖² (ε·Σ_b‖g_b‖ for `normalized`) with g = ∇L on real tokens only; on this model ∇ₓL at padding is as
    large as on real tokens, so a g that kept the padding positions would be larger."""
    epsilon = 0.7
    model, batch = Bag(), bag_batch()
    strategy = GradientPenalty(GradientPenaltyConfig(epsilon=epsilon, mode=mode, target=target))
    result = strategy.training_step(make_ctx(model, batch))
    h = Hand(model, batch)
    u = h.ce_grad_shift(torch.zeros_like(h.s))  # B×H: ∇ₓL at every position of example i
    if target == "embedding_output":
        g = h.to_positions(u)
        size = g.flatten(1).norm(dim=1).sum() if mode == "normalized" else g.pow(2).sum()
    else:
        rows = torch.unique(h.ids[h.m.bool()])
        counts = ((h.ids[..., None] == rows) * h.m[..., None]).sum(1)
        g = counts.T @ u
        size = g.norm() if mode == "normalized" else g.pow(2).sum()
    expected = epsilon * size if mode == "normalized" else 0.5 * epsilon * size
    assert result.metrics["gradient_penalty"] == pytest.approx(float(expected), rel=1e-9)
