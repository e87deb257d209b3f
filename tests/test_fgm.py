"""FGM / FGSM mathematics: size and direction of r, padding, both targets, the two update rules."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_grads_close, make_ctx, step_grads, tiny_bert

from clue_adv.regularizers.fgm import FGM, FGMConfig
from clue_adv.regularizers.perturb import PerturbationSpace

TARGETS = ["embedding_output", "embedding_matrix"]


def clean_gradients(model, batch):
    """By hand: x, g = ∇ₓL (B×T×H, unmasked) and G = ∇_E L for the whole V×H embedding matrix."""
    ctx = make_ctx(model, batch)
    weight = model.get_input_embeddings().weight
    x = ctx.embed()
    x.retain_grad()
    loss = ctx.loss(ctx.forward(x))
    g_x, g_e = torch.autograd.grad(loss, [x, weight])
    return x.detach(), g_x, g_e


def param_grads(model, batch, delta_x: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """By hand: ∇θL(embed + delta_x) for every parameter (the embedding weight through embed())."""
    model.zero_grad(set_to_none=True)
    ctx = make_ctx(model, batch)
    x = ctx.embed()
    loss = ctx.loss(ctx.forward(x if delta_x is None else x + delta_x))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def hand_perturbation_x(model, batch, target: str, epsilon: float) -> torch.Tensor:
    """The FGM-L2 perturbation of x, computed independently of clue_adv's PerturbationSpace."""
    _, g_x, g_e = clean_gradients(model, batch)
    mask = batch.attention_mask.unsqueeze(-1).float()
    if target == "embedding_output":
        g = g_x * mask
        return epsilon * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
    r_matrix = epsilon * g_e / g_e.norm()  # one global norm over the whole matrix
    return r_matrix[batch.input_ids] * mask


def test_l2_per_example_norm_and_direction(batch):
    model = tiny_bert(dropout=0.0)
    ctx = make_ctx(model, batch)
    fgm = FGM(FGMConfig(epsilon=0.3, target="embedding_output"))
    _, g_x, _ = clean_gradients(model, batch)
    space = PerturbationSpace(ctx, "embedding_output")
    r = fgm.perturbation(ctx, space, g_x)
    g = g_x * ctx.mask
    norms = r.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, 0.3))
    dots = (r * g).flatten(1).sum(dim=1)
    torch.testing.assert_close(dots, norms * g.flatten(1).norm(dim=1), rtol=1e-5, atol=0)
    cos = torch.nn.functional.cosine_similarity(r.flatten(1), g.flatten(1), dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos))


def test_l2_matrix_global_norm_and_direction(batch):
    """r over the used rows has ONE norm ε and is parallel to the full ∇_E L (whose other rows are 0)."""
    model = tiny_bert(dropout=0.0)
    ctx = make_ctx(model, batch)
    fgm = FGM(FGMConfig(epsilon=0.3, target="embedding_matrix"))
    _, g_x, g_e = clean_gradients(model, batch)
    space = PerturbationSpace(ctx, "embedding_matrix")
    r = fgm.perturbation(ctx, space, g_x)
    assert r.shape == (len(space.row_ids), g_e.shape[1])
    torch.testing.assert_close(r.norm(), torch.tensor(0.3))
    # ∇_E L vanishes outside the used rows, so r = ε·G/‖G‖ restricted to them.
    assert float(g_e[space.row_ids].norm()) == pytest.approx(float(g_e.norm()), rel=1e-6)
    torch.testing.assert_close(r, 0.3 * g_e[space.row_ids] / g_e.norm(), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close((r * g_e[space.row_ids]).sum(), r.norm() * g_e.norm(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("target", TARGETS)
def test_sign_is_epsilon_elementwise_with_the_sign_of_g(batch, target):
    model = tiny_bert(dropout=0.0)
    ctx = make_ctx(model, batch)
    fgm = FGM(FGMConfig(epsilon=0.01, norm="sign", target=target))
    _, g_x, _ = clean_gradients(model, batch)
    space = PerturbationSpace(ctx, target)
    r = fgm.perturbation(ctx, space, g_x)
    g = space.from_x_grad(g_x)
    nonzero = g != 0
    assert nonzero.float().mean() > 0.5  # the check below is not vacuous
    assert torch.all(r[nonzero].abs() == 0.01)
    assert torch.equal(torch.sign(r), torch.sign(g))
    padding = ~batch.attention_mask.bool()
    assert padding.any()
    if target == "embedding_output":
        assert torch.all(r[padding] == 0)  # in target space: to_x would hide padding entries


@pytest.mark.parametrize("norm", ["l2", "sign"])
@pytest.mark.parametrize("target", TARGETS)
def test_padding_gets_no_perturbation_even_with_a_gradient_there(batch, target, norm):
    model = tiny_bert(dropout=0.0)
    ctx = make_ctx(model, batch)
    space = PerturbationSpace(ctx, target)
    fgm = FGM(FGMConfig(epsilon=0.3, norm=norm, target=target))
    g_x = torch.randn(*batch.input_ids.shape, 32)  # nonzero on padding too
    r = fgm.perturbation(ctx, space, g_x)
    r_x = space.to_x(r)
    padding = ~batch.attention_mask.bool()
    assert torch.all(r_x[~padding].abs().sum(-1) > 0)
    if target == "embedding_output":
        assert torch.all(r[padding] == 0)  # not just hidden by to_x: no share of ε was spent there
    if norm == "l2":  # the whole budget ε lands on real tokens
        torch.testing.assert_close(
            r_x.flatten(1).norm(dim=1) if target == "embedding_output" else r.norm(), space.norms(r)
        )
        torch.testing.assert_close(space.norms(r), torch.full_like(space.norms(r), 0.3))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("combine", ["adversarial_only", "sum"])
def test_parameter_gradients_equal_the_hand_computation(batch, target, combine):
    model = tiny_bert(dropout=0.0)
    delta_x = hand_perturbation_x(model, batch, target, 0.3)
    adversarial = param_grads(model, batch, delta_x)
    clean = param_grads(model, batch)
    # r must matter at this ε, or the comparison could not tell FGM from plain training
    assert not torch.allclose(adversarial["classifier.weight"], clean["classifier.weight"], rtol=1e-2)
    expected = adversarial if combine == "adversarial_only" else {n: clean[n] + adversarial[n] for n in clean}
    grads = step_grads(FGM(FGMConfig(epsilon=0.3, target=target, combine=combine)), model, batch)
    assert_grads_close(grads, expected, atol_scale=1e-5)


def test_matrix_target_leaves_the_embedding_matrix_untouched(batch):
    model = tiny_bert(dropout=0.0)
    weight = model.get_input_embeddings().weight
    before = weight.detach().clone()
    delta_x = hand_perturbation_x(model, batch, "embedding_matrix", 0.3)
    clean, adversarial = param_grads(model, batch), param_grads(model, batch, delta_x)
    expected = {n: clean[n] + adversarial[n] for n in clean}
    grads = step_grads(FGM(FGMConfig(epsilon=0.3, target="embedding_matrix", combine="sum")), model, batch)
    assert torch.equal(weight.detach(), before)  # bit for bit: r is never written into E
    # the only gradients are the two legitimate backward passes (clean + adversarial), on parameters only
    assert_grads_close(grads, expected, atol_scale=1e-5)
    assert all(p.is_leaf for p in model.parameters())


@pytest.mark.parametrize("target", TARGETS)
def test_relative_epsilon_is_scaled_by_the_embedding_norm(batch, target):
    model = tiny_bert(dropout=0.0)
    ctx = make_ctx(model, batch)
    space = PerturbationSpace(ctx, target)
    _, g_x, _ = clean_gradients(model, batch)
    mask = ctx.mask
    with torch.no_grad():
        x = model.get_input_embeddings()(batch.input_ids) * mask
        if target == "embedding_output":
            scale = x.flatten(1).norm(dim=1).mean()
            coordinate = (x.flatten(1).norm(dim=1) / (mask.flatten(1).sum(1) * 32).sqrt()).mean()
        else:
            rows = model.get_input_embeddings().weight[space.row_ids]
            scale = rows.norm()
            coordinate = scale / rows.numel() ** 0.5
    r = FGM(FGMConfig(epsilon=0.1, epsilon_unit="relative", target=target)).perturbation(ctx, space, g_x)
    torch.testing.assert_close(space.norms(r), torch.full_like(space.norms(r), 0.1 * float(scale)))
    # sign: relative to one coordinate, so that ‖r‖₂ is ε·‖x‖ again, not √n times that
    fgsm = FGM(FGMConfig(epsilon=0.1, epsilon_unit="relative", norm="sign", target=target))
    r = fgsm.perturbation(ctx, space, g_x)
    g = space.from_x_grad(g_x)
    torch.testing.assert_close(r[g != 0].abs(), torch.full_like(r[g != 0], 0.1 * float(coordinate)))


@pytest.mark.parametrize("combine", ["adversarial_only", "sum"])
def test_parameter_without_gradient_does_not_crash(batch, combine):
    model = tiny_bert(dropout=0.0)
    model.unused = torch.nn.Linear(3, 3)  # registered, never called: its .grad stays None
    result = FGM(FGMConfig(combine=combine)).training_step(make_ctx(model, batch))
    assert torch.isfinite(result.loss)
    assert model.unused.weight.grad is None


def test_special_token_share_is_the_share_of_the_perturbation_on_cls_and_sep(batch):
    """The logged special-token share (REGULARIZERS.md asks runs to log it): for FGM on the embedding matrix r ∝ ∇_E L
    on the rows the batch uses, so the share is Σ‖∇_E L[i]‖² over [CLS]/[SEP] rows / Σ over used rows, by hand."""
    model = tiny_bert(dropout=0.0)
    model.zero_grad(set_to_none=True)
    ctx = make_ctx(model, batch)
    ctx.loss(ctx.forward(ctx.embed())).backward()
    grad_rows = model.get_input_embeddings().weight.grad.pow(2).sum(1)
    used = batch.input_ids[batch.attention_mask.bool()].unique()
    special = used[torch.isin(used, torch.tensor([101, 102]))]  # the batch's special tokens: [CLS] and [SEP]
    assert len(special) == 2
    expected = float(grad_rows[special].sum() / grad_rows[used].sum())
    model.zero_grad(set_to_none=True)
    result = FGM(FGMConfig(epsilon=0.5, target="embedding_matrix")).training_step(make_ctx(model, batch))
    assert 0 < expected < 1
    assert result.metrics["special_token_share"] == pytest.approx(expected, rel=1e-4)
