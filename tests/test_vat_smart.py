"""VAT and SMART: power iteration finds the KL Hessian's top eigenvector; ξ is above fp32 noise; the
step's gradients are the stated objectives; SMART's teacher is an EMA and its ball is L∞."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_grads_close, make_ctx, step_grads, tiny_bert

from clue_adv.regularizers.perturb import PerturbationSpace
from clue_adv.regularizers.smart import SMART, SMARTConfig, symmetric_kl
from clue_adv.regularizers.vat import VAT, VATConfig, kl_divergence, power_iteration

TARGETS = ["embedding_output", "embedding_matrix"]


def param_grads_of(model, loss_fn) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


# -- power iteration on f(x) = softmax(Wx) ------------------------------------------------------------
def linear_softmax_kl(seed: int = 0, classes: int = 5, dim: int = 8):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(classes, dim, generator=gen, dtype=torch.float64)
    x = torch.randn(dim, generator=gen, dtype=torch.float64)

    def kl(v: torch.Tensor) -> torch.Tensor:  # KL(f(x) ‖ f(x + v))
        log_p, log_q = F.log_softmax(w @ x, -1), F.log_softmax(w @ (x + v), -1)
        return (log_p.exp() * (log_p - log_q)).sum()

    return kl, dim


def test_power_iteration_converges_to_the_dominant_hessian_eigenvector():
    kl, dim = linear_softmax_kl()
    hessian = torch.autograd.functional.hessian(kl, torch.zeros(dim, dtype=torch.float64))
    eigenvalues, eigenvectors = torch.linalg.eigh(hessian)
    top = eigenvectors[:, -1]
    assert eigenvalues[-2] < 0.8 * eigenvalues[-1]  # a real gap, so convergence is the thing being tested
    start = torch.randn(dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert abs(float(start @ top / start.norm())) < 0.5
    d = power_iteration(kl, start, xi=1e-4, iterations=20)
    assert float(d.norm()) == pytest.approx(1.0)
    assert abs(float(d @ top)) > 0.99
    # one iteration is one multiplication by the Hessian: d̂₁ ∥ H·d₀
    one = power_iteration(kl, start, xi=1e-4, iterations=1)
    h_d = hessian @ start
    assert float(one @ h_d / h_d.norm()) > 0.9999


def test_xi_default_is_above_fp32_rounding(batch):
    """One power-iteration step on a tiny BERT: fp32 with ξ = 1e-3 (the default) matches a float64 reference;
    fp32 with the paper's ξ = 1e-6 is mostly rounding noise."""
    model32 = tiny_bert(dropout=0.0).eval()
    model64 = copy.deepcopy(model32).double()
    mask = batch.attention_mask.unsqueeze(-1)

    def kl_for(model):
        x = model.get_input_embeddings()(batch.input_ids).detach()
        with torch.no_grad():
            clean = model(inputs_embeds=x, attention_mask=batch.attention_mask).logits

        def kl(v: torch.Tensor) -> torch.Tensor:  # in the model's own precision (no fp32 cast here)
            q = model(inputs_embeds=x + (v * mask).to(x.dtype), attention_mask=batch.attention_mask).logits
            log_p, log_q = F.log_softmax(clean, -1), F.log_softmax(q, -1)
            return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

        return kl

    start = torch.randn(*mask.shape[:2], 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * mask
    reference = power_iteration(kl_for(model64), start, xi=1e-3, iterations=1)
    default_xi = VATConfig().xi
    fp32 = power_iteration(kl_for(model32), start.float(), xi=default_xi, iterations=1).double()
    assert float((fp32 * reference).sum()) > 0.999
    paper_xi = power_iteration(kl_for(model32), start.float(), xi=1e-6, iterations=1).double()
    assert float((paper_xi * reference).sum()) < 0.5


# -- VAT on the tiny BERT -----------------------------------------------------------------------------
@pytest.mark.parametrize("target", TARGETS)
def test_vat_gradient_is_ce_plus_alpha_kl_with_a_detached_clean_distribution(batch, target):
    model = tiny_bert(dropout=0.0)
    vat = VAT(VATConfig(epsilon=0.1, alpha=2.0, xi=1e-3, target=target))
    vat.keep_iterates = True
    torch.manual_seed(0)
    grads = step_grads(vat, model, batch)
    space = PerturbationSpace(make_ctx(model, batch), target)
    start, direction = vat.iterates
    assert torch.all((space.norms(direction) - 1).abs() < 1e-5)
    # the power-iteration step, by hand: d̂₁ ∥ ∇_d KL(f(x) ‖ f(x + ξ·d̂₀))
    ctx = make_ctx(model, batch)
    x = ctx.embed().detach()
    clean = ctx.forward(x).detach()
    probe = start.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(kl_divergence(clean, ctx.forward(x + space.to_x(1e-3 * probe))), probe)
    torch.testing.assert_close(direction, g / space.per_unit(space.norms(g)), rtol=1e-4, atol=1e-6)

    r = 0.1 * direction

    def objective() -> torch.Tensor:
        ctx = make_ctx(model, batch)
        x = ctx.embed()
        logits = ctx.forward(x)
        return ctx.loss(logits) + 2.0 * kl_divergence(logits.detach(), ctx.forward(x + space.to_x(r)))

    assert_grads_close(grads, param_grads_of(model, objective))


@pytest.mark.parametrize("target", TARGETS)
def test_vat_direction_is_far_more_adversarial_than_random(batch, target):
    model = tiny_bert(dropout=0.0)
    torch.manual_seed(0)
    result = VAT(VATConfig(epsilon=0.1, target=target)).training_step(make_ctx(model, batch))
    ctx = make_ctx(model, batch)
    space = PerturbationSpace(ctx, target)
    with torch.no_grad():
        x = ctx.embed()
        clean = ctx.forward(x)
        random_kl = [
            float(kl_divergence(clean, ctx.forward(x + space.to_x(0.1 * space.direction(space.gaussian(1.0), "l2")))))
            for _ in range(10)
        ]
    assert result.metrics["perturbation_norm"] == pytest.approx(0.1, rel=1e-5)
    assert result.metrics["kl"] > 5 * max(random_kl)


# -- SMART --------------------------------------------------------------------------------------------
def test_symmetric_kl_is_the_sum_of_both_kls():
    p, q = torch.randn(6, 5), torch.randn(6, 5)
    both = kl_divergence(p, q) + kl_divergence(q, p)
    torch.testing.assert_close(symmetric_kl(p, q), both)
    torch.testing.assert_close(symmetric_kl(q, p), both)
    assert float(symmetric_kl(p, p)) == 0.0


def test_smart_teacher_is_an_ema_of_the_model(batch):
    model = tiny_bert(dropout=0.0)
    smart = SMART(SMARTConfig(momentum=0.9))
    smart.setup(model)
    teacher = smart.teacher
    assert teacher is not model and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    old = [p.detach().clone() for p in teacher.parameters()]
    # a step of the strategy leaves the teacher alone (no grads, no change) ...
    smart.training_step(make_ctx(model, batch))
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(old, teacher.parameters(), strict=True))
    # ... the optimizer moves the model, then the hook moves the teacher 10% of the way
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    new = [p.detach().clone() for p in model.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(old, new, strict=True))
    buffers = dict(model.named_buffers())
    assert buffers, "BERT has buffers (position ids); the teacher copies them, it does not average them"
    for b in buffers.values():
        b.add_(1)
    smart.after_optimizer_step(model)
    for before, student, now in zip(old, new, teacher.parameters(), strict=True):
        torch.testing.assert_close(now, 0.9 * before + 0.1 * student)
    for name, b in teacher.named_buffers():
        assert torch.equal(b, buffers[name]), name


@pytest.mark.parametrize("target", TARGETS)
def test_smart_projection_keeps_every_iterate_in_the_linf_ball(batch, target):
    model = tiny_bert(dropout=0.0)
    smart = SMART(SMARTConfig(epsilon=1e-3, step_size=1e-2, noise_std=1e-3, iterations=3, target=target))
    smart.keep_iterates = True
    result = smart.training_step(make_ctx(model, batch))
    assert len(smart.iterates) == 4
    for r in smart.iterates[1:]:  # r₀ is the Gaussian start, projected by the first step
        assert float(r.abs().max()) <= 1e-3 * (1 + 1e-6)
    assert bool((smart.iterates[-1].abs() >= 1e-3 * (1 - 1e-6)).any())  # the projection was active
    assert result.metrics["perturbation_linf"] <= 1e-3 * (1 + 1e-6)


def test_smart_gradient_is_the_stated_objective(batch):
    """CE + α·ℓ_s(f(x + r), f(x)) (through both) + μ·ℓ_s(f(x), f_θ̃(x)) (teacher constant)."""
    model = tiny_bert(dropout=0.0)
    smart = SMART(SMARTConfig(epsilon=1e-2, step_size=1e-2, noise_std=1e-3, alpha=3.0, mu=2.0))
    smart.keep_iterates = True
    smart.setup(model)
    # move the model away from its teacher so the Bregman term has a gradient
    ctx = make_ctx(model, batch)
    ctx.loss(ctx.forward()).backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    grads = step_grads(smart, model, batch)
    r = smart.iterates[-1]
    space = PerturbationSpace(make_ctx(model, batch), "embedding_output")
    with torch.no_grad():
        teacher = smart.teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    def smoothness_and_task() -> torch.Tensor:
        ctx = make_ctx(model, batch)
        x = ctx.embed()
        logits = ctx.forward(x)
        return ctx.loss(logits) + 3.0 * symmetric_kl(ctx.forward(x + space.to_x(r)), logits)

    def bregman() -> torch.Tensor:
        return 2.0 * symmetric_kl(make_ctx(model, batch).forward(), teacher)

    expected = param_grads_of(model, lambda: smoothness_and_task() + bregman())
    assert_grads_close(grads, expected)
    # the teacher term is a visible part of that gradient, so the comparison above checks it too
    teacher_part = param_grads_of(model, bregman)["classifier.weight"]
    assert teacher_part.norm() > 0.01 * expected["classifier.weight"].norm()


@pytest.mark.parametrize("same_mask", [True, False])
@pytest.mark.parametrize("method", ["vat", "smart"])
def test_shared_dropout_mask_makes_the_divergence_measure_the_perturbation_only(batch, method, same_mask):
    """With dropout on, the divergence to f(x) is quadratic in the perturbation size (halving ε quarters it)
    only if all passes share their dropout masks; with fresh masks the mask disagreement dominates."""
    model = tiny_bert(dropout=0.3)
    divergences = []
    for epsilon in (2e-2, 1e-2):
        torch.manual_seed(0)
        if method == "vat":
            strategy = VAT(VATConfig(epsilon=epsilon, same_dropout_mask=same_mask))
            key = "kl"
        else:
            strategy = SMART(
                SMARTConfig(
                    epsilon=epsilon, step_size=epsilon, noise_std=epsilon / 10, mu=0.0, same_dropout_mask=same_mask
                )
            )
            key = "adv_kl"
        divergences.append(strategy.training_step(make_ctx(model, batch)).metrics[key])
    ratio = divergences[0] / divergences[1]
    if same_mask:
        assert ratio == pytest.approx(4.0, rel=0.1)
    else:
        assert ratio < 2.0


def test_smart_embedding_matrix_gradient_matches_a_hand_built_loss(batch):
    """SMART on the word-embedding matrix, rebuilt independently: r lives on the used vocabulary rows, the
    perturbed input is F.embedding(ids, W + R), and the ascent is done by hand with torch.autograd."""
    eps, step, std, alpha, iters, seed = 5e-2, 5e-2, 1e-3, 3.0, 2, 0
    model = tiny_bert(dropout=0.0)
    cfg = SMARTConfig(
        target="embedding_matrix",
        epsilon=eps,
        step_size=step,
        noise_std=std,
        alpha=alpha,
        mu=0.0,
        iterations=iters,
        epsilon_unit="absolute",
    )
    grads = step_grads(SMART(cfg), model, batch, seed=seed)

    emb = model.get_input_embeddings().weight
    ids, mask = batch.input_ids, batch.attention_mask
    rows = torch.unique(ids[mask.bool()])  # sorted vocabulary rows of the real tokens

    def logits_of(x: torch.Tensor) -> torch.Tensor:
        return model(inputs_embeds=x, attention_mask=mask, token_type_ids=batch.token_type_ids).logits

    def perturbation(r: torch.Tensor) -> torch.Tensor:
        full = torch.zeros_like(emb).index_put((rows,), r)  # only the used rows move; [PAD] (row 0) is not used
        return F.embedding(ids, full) * mask.unsqueeze(-1)

    def sym_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
        p, q = F.softmax(p_logits, -1), F.softmax(q_logits, -1)
        kl_pq = (p * (p.log() - q.log())).sum(-1)
        kl_qp = (q * (q.log() - p.log())).sum(-1)
        return (kl_pq + kl_qp).mean()

    torch.manual_seed(seed)  # SMART draws r₀ before anything else
    r = torch.randn(len(rows), emb.shape[1]) * std
    with torch.no_grad():
        x0 = F.embedding(ids, emb)
        clean = logits_of(x0)
    for _ in range(iters):
        r = r.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(sym_kl(logits_of(x0 + perturbation(r)), clean), r)
        r = (r.detach() + step * g / g.abs().max()).clamp(-eps, eps)  # L∞ ascent over the used rows, projected
    assert bool((r.abs() >= eps * (1 - 1e-6)).any())  # the projection is active, so the check covers it

    def objective() -> torch.Tensor:
        x = F.embedding(ids, emb)
        logits = logits_of(x)
        return F.cross_entropy(logits, batch.labels) + alpha * sym_kl(logits_of(x + perturbation(r)), logits)

    expected = param_grads_of(model, objective)
    assert_grads_close(grads, expected)
    # the smoothness term moves that gradient beyond the tolerance, so the comparison above checks it too
    ce_only = param_grads_of(model, lambda: F.cross_entropy(logits_of(F.embedding(ids, emb)), batch.labels))
    with pytest.raises(AssertionError):
        assert_grads_close(grads, ce_only)
