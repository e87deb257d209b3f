"""Output-gradient (Jacobian) penalty by the study's random-sign trick: CE + λ·Σᵢ‖∇ₓfᵢ‖² per example.

f = softmax probabilities. For η with independent ±1 entries (one per example and class),
E‖∇ₓ Σ_{b,i} η_{bi} f_{bi}‖² = Σ_{b,i} ‖∇ₓf_{bi}‖², because E η_{bi}η_{cj} = δ_{bc}δ_{ij} kills every cross
term; so one backward of the scalar Σ η·f replaces C backwards (the study's eq. 9). The estimate is
divided by the batch size, making λ a weight per example like the mean CE it is added to. This is the
regularizer that consistency training with `divergence: mse` and noise σ approximates with λ ≈ σ² (the
study's eq. 8). The loss backpropagates through the estimate: a double backward (eager attention).

`embedding_output`: ∇ over each example's tokens (an example's f depends on its own x only, so the
batch-wide gradient splits into per-example ones). `embedding_matrix`: ∇_E, the rows of the used tokens;
cross-example terms also vanish in expectation, so the estimate stays unbiased for Σ_{b,i}‖∇_E f_{bi}‖².

Gradient accumulation: split-invariant with `embedding_output` (for the same signs); with `embedding_matrix`
only in expectation, cross-example terms being per micro-batch (`accumulation` below; StepContext's rule).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from clue_adv.regularizers import register
from clue_adv.regularizers.base import StepContext, StepCost, StepResult, Strategy, StrategyConfig, Target
from clue_adv.regularizers.perturb import PerturbationSpace


class JacobianPenaltyConfig(StrategyConfig):
    name: Literal["jacobian_penalty"] = Field(
        "jacobian_penalty", description="Penalty on the gradients of the output probabilities (random-sign estimate)."
    )
    target: Target = Field(
        "embedding_output",
        description="Differentiate with respect to each token's word-embedding output, or the used rows of the "
        "word-embedding matrix.",
    )
    weight: float = Field(
        0.01,
        ge=0,
        description="λ: weight of the per-example mean of Σᵢ‖∇ₓfᵢ‖² (no reference value in the study; mse "
        "consistency with noise σ corresponds to λ ≈ σ², so 0.01 ≈ σ = 0.1).",
    )
    samples: int = Field(1, ge=1, description="Sign vectors η averaged per step (one backward each; the study: 1).")


def rademacher_signs(shape: torch.Size | tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Independent ±1 entries with equal probability (from the global generator, so seeded runs repeat)."""
    return torch.randint(0, 2, shape, device=device).mul_(2).sub_(1).to(torch.float32)


def signed_output_gradient(
    ctx: StepContext, space: PerturbationSpace, x: torch.Tensor, probs: torch.Tensor, signs: torch.Tensor
) -> torch.Tensor:
    """∇ of Σ_{b,i} η_{bi} f_{bi} in target space, differentiable (create_graph) so a loss can use it."""
    return space.from_x_grad(ctx.grad((signs.to(probs.dtype) * probs).sum(), x, create_graph=True))


def jacobian_estimate(
    ctx: StepContext, space: PerturbationSpace, x: torch.Tensor, probs: torch.Tensor, samples: int
) -> torch.Tensor:
    """Unbiased estimate of mean_b Σᵢ‖∇f_{bi}‖² from `samples` sign draws (differentiable)."""
    total = probs.new_zeros(())
    for _ in range(samples):
        grad = signed_output_gradient(ctx, space, x, probs, rademacher_signs(probs.shape, probs.device))
        total = total + space.squared_norm_sum(grad)
    return total / (samples * probs.shape[0])


@register
class JacobianPenalty(Strategy):
    config_class = JacobianPenaltyConfig
    summary = "CE + λ·Σᵢ‖∇ₓfᵢ‖² (softmax outputs), one random-sign backward per sample"
    accumulation = (
        "embedding_output: split-invariant for the same sign draws (each example's f depends on its own x, and the "
        "estimate is a mean over examples). embedding_matrix: the same in expectation over the signs, not per draw: "
        "one draw's cross-example terms (mean zero) involve only the pairs of examples inside a micro-batch."
    )
    config: JacobianPenaltyConfig

    def cost(self) -> StepCost:
        return StepCost(
            forward=1,
            backward=self.config.samples + 1,
            double_backward=True,
            note="one create_graph backward per sign sample, then one backward through them (the double backward)",
        )

    def training_step(self, ctx: StepContext) -> StepResult:
        space = PerturbationSpace(ctx, self.config.target)
        x = ctx.embed()
        logits = ctx.forward(x)
        loss = ctx.loss(logits)
        estimate = jacobian_estimate(ctx, space, x, torch.softmax(logits, dim=-1), self.config.samples)
        ctx.backward(loss + self.config.weight * estimate)
        return StepResult(loss.detach(), {"jacobian_norm_sq": estimate.detach()})
