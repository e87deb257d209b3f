"""gaussian_noise's `samples: k` and `antithetic: true` against their definitions (the study's eqs. 4 and 5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_ctx, step_grads, tiny_bert

from clue_adv.regularizers.base import StepContext
from clue_adv.regularizers.gaussian_noise import GaussianNoise, GaussianNoiseConfig


class RecordingContext(StepContext):
    """Keeps every input the strategy feeds to the model and the per-example losses that come out, in the model's
    dtype (the real context rounds logits to fp32, too coarse for σ⁴ differences)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.inputs: list[torch.Tensor] = []
        self.losses: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed() if x is None else x
        self.counter.forward += 1
        logits = self.model(
            inputs_embeds=x, attention_mask=self.batch.attention_mask, token_type_ids=self.batch.token_type_ids
        ).logits
        self.inputs.append(x.detach())
        self.losses.append(F.cross_entropy(logits.detach(), self.batch.labels, reduction="none"))
        return logits


def test_samples_average_the_loss_and_gradient_over_k_draws(batch):
    """k = 3, float64, no dropout: the gradient is that of the mean of L(x + σξⱼ) over three draws made by hand
    from the same seed (N(0, I)·σ on real tokens, in turn); the logged loss is their mean; 3 passes of each."""
    model = tiny_bert(4, hidden=16, layers=1, dtype=torch.float64, dropout=0.0)
    sigma, k = 0.05, 3
    mask = batch.attention_mask.unsqueeze(-1).float()
    torch.manual_seed(11)
    # drawn in fp32 as the strategy draws, then cast to the model's float64
    draws = [(torch.randn(*batch.input_ids.shape, 16) * sigma * mask).double() for _ in range(k)]
    model.zero_grad(set_to_none=True)
    x = model.get_input_embeddings()(batch.input_ids)
    losses = [
        F.cross_entropy(
            model(inputs_embeds=x + d, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids).logits,
            batch.labels,
        )
        for d in draws
    ]
    (sum(losses) / k).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}

    strategy = GaussianNoise(GaussianNoiseConfig(sigma=sigma, samples=k))
    got = step_grads(strategy, model, batch, seed=11)
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-10, atol=1e-13, msg=name)
    torch.manual_seed(11)
    ctx = make_ctx(model, batch)
    result = strategy.training_step(ctx)
    assert float(result.loss) == pytest.approx(float(sum(losses).detach() / k), rel=1e-12)
    assert (ctx.counter.forward, ctx.counter.backward) == (3, 3)
    assert (strategy.cost().forward, strategy.cost().backward) == (3, 3)


def _pair_error(model, batch, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, ½[ℓ(x + σξ) + ℓ(x − σξ)] − ℓ(x) − ½σ²ξᵀ∇ₓ²ℓξ (antithetic), and the same for the single draw
    ℓ(x + σξ) alone, with ξ the strategy's own draw (seed 3) and the quadratic form by a Hessian-vector product."""
    torch.manual_seed(3)
    ctx = RecordingContext(model, batch)
    GaussianNoise(GaussianNoiseConfig(sigma=sigma, antithetic=True)).training_step(ctx)
    x = ctx.embed().detach()
    plus, minus = ctx.inputs
    delta = plus - x
    torch.testing.assert_close(minus - x, -delta, rtol=0, atol=1e-15)  # the pair is ±σξ
    xr = x.clone().requires_grad_(True)
    out = model(inputs_embeds=xr, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids).logits
    clean = F.cross_entropy(out, batch.labels, reduction="none")
    (g,) = torch.autograd.grad(clean.sum(), xr, create_graph=True)
    (hv,) = torch.autograd.grad(g, xr, grad_outputs=delta)
    quadratic = 0.5 * (delta * hv).flatten(1).sum(1)  # per example: blocks of the Hessian of the sum
    clean = clean.detach()
    pair = 0.5 * (ctx.losses[0] + ctx.losses[1]) - clean - quadratic
    single = ctx.losses[0] - clean - quadratic
    return pair, single


def test_antithetic_pair_is_loss_plus_half_sigma_squared_curvature_to_third_order(batch):
    """float64: the pair average misses L + ½σ²ξᵀHξ only by the fourth-order term, per example, so halving σ
    divides the miss by ≈ 16; a single draw misses by its first-order term, halving only."""
    model = tiny_bert(4, hidden=8, layers=1, dtype=torch.float64, dropout=0.0)
    errors = {sigma: _pair_error(model, batch, sigma) for sigma in (0.01, 0.005, 0.0025)}
    for big, small in ((0.01, 0.005), (0.005, 0.0025)):
        ratio = errors[big][0].abs() / errors[small][0].abs()
        assert bool(((ratio > 13) & (ratio < 19)).all()), ratio  # measured 15.3-17.5
        single = errors[big][1].abs() / errors[small][1].abs()
        assert bool(((single > 1.85) & (single < 2.15)).all()), single  # measured 1.93-2.0


def test_antithetic_pair_shares_its_dropout_masks(batch):
    """With dropout 0.3 and σ = 1e-7 the two passes of a pair differ only by O(σ): the same masks. Two independent
    draws (samples: 2) get different masks and differ by O(1)."""
    model = tiny_bert(4, hidden=16, layers=1, dtype=torch.float64, dropout=0.3).train()
    torch.manual_seed(0)
    pair = RecordingContext(model, batch)
    GaussianNoise(GaussianNoiseConfig(sigma=1e-7, antithetic=True)).training_step(pair)
    assert float((pair.losses[0] - pair.losses[1]).abs().max()) < 1e-5
    torch.manual_seed(0)
    two = RecordingContext(model, batch)
    GaussianNoise(GaussianNoiseConfig(sigma=1e-7, samples=2)).training_step(two)
    assert float((two.losses[0] - two.losses[1]).abs().max()) > 1e-3


def test_cost_counts_every_pass():
    for samples, antithetic, passes in ((1, False, 1), (4, False, 4), (1, True, 2), (3, True, 6)):
        cost = GaussianNoise(GaussianNoiseConfig(samples=samples, antithetic=antithetic)).cost()
        assert (cost.forward, cost.backward, cost.double_backward) == (passes, passes, False)
    with pytest.raises(ValueError):
        GaussianNoiseConfig(samples=0)


def test_one_draw_is_the_plain_strategy_bit_for_bit(batch):
    """samples: 1 without antithetic keeps the single-pass code: same gradient, same random stream afterwards."""
    model = tiny_bert(4, hidden=16, layers=1, dropout=0.1).train()
    plain = step_grads(GaussianNoise(GaussianNoiseConfig(sigma=0.1)), model, batch, seed=4)
    after_plain = torch.get_rng_state()
    explicit = step_grads(GaussianNoise(GaussianNoiseConfig(sigma=0.1, samples=1, antithetic=False)), model, batch, 4)
    assert torch.equal(torch.get_rng_state(), after_plain)
    for name, grad in plain.items():
        assert torch.equal(explicit[name], grad), name
