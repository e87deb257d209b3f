"""Gaussian noise on the embeddings: where it goes, its size, σ = 0, and the Taylor (curvature) identity."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch
from conftest import SENTENCES, make_ctx, tiny_bert

from clue_adv.regularizers.base import Batch, StepContext
from clue_adv.regularizers.gaussian_noise import GaussianNoise, GaussianNoiseConfig
from clue_adv.regularizers.none import NoneConfig, NoRegularizer


class RecordingContext(StepContext):
    """Keeps what the strategy feeds to the model and what comes out; logits stay in the model's dtype (the
    real context rounds them to fp32, too coarse for the σ² differences below)."""

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        if x is None:
            x = self.embed()
        self.counter.forward += 1
        self.inputs = x.detach()
        out = self.model(
            inputs_embeds=x, attention_mask=self.batch.attention_mask, token_type_ids=self.batch.token_type_ids
        )
        self.logits = out.logits.detach()
        return out.logits


def test_noise_is_zero_on_padding_and_has_std_sigma(batch):
    """20 draws × every real coordinate (~30k values): mean 0, std σ within 2%, Gaussian by a KS test;
    padding positions exactly untouched; two draws differ."""
    model = tiny_bert(4, hidden=32, layers=1, dropout=0.0)
    sigma = 0.1
    strategy = GaussianNoise(GaussianNoiseConfig(sigma=sigma))
    real = batch.attention_mask.bool()
    assert not real.all()  # the fixture has padding
    torch.manual_seed(0)
    draws = []
    for _ in range(20):
        ctx = RecordingContext(model, batch)
        strategy.training_step(ctx)
        noise = ctx.inputs - ctx.embed().detach()
        assert torch.equal(noise[~real], torch.zeros_like(noise[~real]))
        draws.append(noise[real].flatten())
    assert not torch.equal(draws[0], draws[1])
    values = torch.cat(draws).double()
    n = values.numel()
    assert abs(float(values.mean())) < 5 * sigma / math.sqrt(n)
    assert float(values.std()) == pytest.approx(sigma, rel=0.02)
    assert scipy.stats.kstest((values / sigma).numpy(), "norm").pvalue > 1e-3


def test_sigma_zero_gives_the_baseline_gradients_exactly(batch):
    """σ = 0 must not even draw noise: the dropout masks, hence every gradient, equal the baseline's bit for bit."""
    model = tiny_bert(4, hidden=16, layers=1, dropout=0.1).train()

    def grads(strategy) -> list[torch.Tensor]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        strategy.training_step(make_ctx(model, batch))
        return [p.grad.clone() for p in model.parameters()]

    baseline = grads(NoRegularizer(NoneConfig()))
    for got, want in zip(grads(GaussianNoise(GaussianNoiseConfig(sigma=0.0))), baseline):
        assert torch.equal(got, want)
    noisy = grads(GaussianNoise(GaussianNoiseConfig(sigma=0.01)))
    assert any(not torch.equal(got, want) for got, want in zip(noisy, baseline))


def test_expected_noisy_loss_is_loss_plus_half_sigma_squared_laplacian(tokenizer):
    """E[L(x + σξ)] − L(x) ≈ ½σ²·tr ∇ₓ²L (the study's eq. 6) for one title, float64, σ = 1e-3.

    The strategy's own draws: a batch of N copies of the title gives N noise draws in one step. The linear
    term σ·g·ξ has mean zero but a standard deviation far above the σ² signal, so it is subtracted from each
    draw (a control variate with known mean 0); what remains averages ½σ²·ξᵀHξ. The trace is exact: one
    Hessian-vector product per coordinate of x (T×H ≈ 170 here). Tolerance: 5 standard errors of the mean
    plus 1% for the O(σ⁴) remainder."""
    model = tiny_bert(4, hidden=8, layers=1, dtype=torch.float64, dropout=0.0)
    one = tokenizer([SENTENCES[0]], return_tensors="pt")
    n, label, sigma = 4000, 2, 1e-3

    # L, g and tr H at x for the single example.
    single = RecordingContext(model, Batch(one["input_ids"], one["attention_mask"], torch.tensor([label])))
    x = single.embed()
    loss = single.loss(single.forward(x))
    (g,) = torch.autograd.grad(loss, x, create_graph=True)
    flat = g.flatten()
    trace = sum(float(torch.autograd.grad(flat[k], x, retain_graph=True)[0].flatten()[k]) for k in range(flat.numel()))

    ids = one["input_ids"].expand(n, -1)
    batch = Batch(ids, one["attention_mask"].expand(n, -1), torch.full((n,), label))
    ctx = RecordingContext(model, batch)
    torch.manual_seed(0)
    result = GaussianNoise(GaussianNoiseConfig(sigma=sigma)).training_step(ctx)
    losses = torch.nn.functional.cross_entropy(ctx.logits, batch.labels, reduction="none")
    assert float(result.loss) == pytest.approx(float(losses.mean()), rel=1e-12)
    delta = ctx.inputs - x.detach()  # σξ for every copy
    second_order = losses - float(loss.detach()) - (delta * g.detach()).flatten(1).sum(1)
    expected = 0.5 * sigma**2 * trace
    standard_error = float(second_order.std()) / math.sqrt(n)
    assert abs(float(second_order.mean()) - expected) < 5 * standard_error + 0.01 * abs(expected)
    assert 5 * standard_error < 0.3 * abs(expected)  # the check has teeth: a σ off by √2 would fail it


def _grads_on_noisy_matrix(model: torch.nn.Module, batch: Batch, noise_rows: dict[int, torch.Tensor]):
    """By hand: ∇θ CE on a copy of the model whose embedding rows have the noise added in place."""
    import copy

    twin = copy.deepcopy(model)
    with torch.no_grad():
        for row, noise in noise_rows.items():
            twin.get_input_embeddings().weight[row] += noise
    twin.zero_grad(set_to_none=True)
    logits = twin(input_ids=batch.input_ids, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids)
    torch.nn.functional.cross_entropy(logits.logits, batch.labels).backward()
    return {n: p.grad for n, p in twin.named_parameters()}


def test_matrix_target_noises_the_embedding_rows_and_leaves_them_untouched(batch):
    """target embedding_matrix: one draw per used row, shared by every occurrence of the token (the gradient is
    that of the model with E + N for the seeded draw N); the embedding weight is bit-exact after the step."""
    model = tiny_bert(4, hidden=16, layers=1, dropout=0.0, dtype=torch.float64)
    sigma = 0.3
    weight_before = model.get_input_embeddings().weight.detach().clone()
    real = batch.input_ids[batch.attention_mask.bool()]
    rows = torch.unique(real)
    assert len(rows) < len(real)  # some token repeats, so per-row and per-position noise differ
    torch.manual_seed(7)
    draw = torch.randn(len(rows), 16) * sigma
    want = _grads_on_noisy_matrix(model, batch, {int(r): d for r, d in zip(rows, draw)})

    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    GaussianNoise(GaussianNoiseConfig(sigma=sigma, target="embedding_matrix")).training_step(make_ctx(model, batch))
    assert torch.equal(model.get_input_embeddings().weight.detach(), weight_before)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[name], rtol=1e-9, atol=1e-12, msg=name)


def test_default_target_is_the_embedding_output():
    assert GaussianNoiseConfig().target == "embedding_output"
    assert GaussianNoiseConfig().epsilon_unit == "absolute"
