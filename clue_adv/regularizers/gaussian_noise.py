"""Gaussian noise on the word embeddings: train on L(x + σξ), ξ ~ N(0, I).

By Taylor, E[L(x + σξ)] ≈ L(x) + ½σ²·tr ∇ₓ²L: the study's "noise ≈ loss + ½σ²ΔL" curvature penalty.

Gradient accumulation: split-invariant with `embedding_output` (for the same draws); with `embedding_matrix`
only in expectation (`accumulation` below; StepContext has the rule).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from clue_adv.regularizers import register
from clue_adv.regularizers.base import StepContext, StepCost, StepResult, Strategy
from clue_adv.regularizers.perturb import PerturbationConfig, PerturbationSpace, accumulation_note


class GaussianNoiseConfig(PerturbationConfig):
    name: Literal["gaussian_noise"] = Field("gaussian_noise", description="Gaussian noise on embeddings.")
    sigma: float = Field(
        0.01,
        ge=0,
        description="Std of the noise added to each coordinate of the target (absolute: embedding units; "
        "bert-base-chinese embedding coordinates have std ≈ 0.05, a random-init BERT's 0.02; relative: a fraction "
        "of the typical coordinate ‖x‖/√n). With `embedding_matrix` one draw per used row, shared by its tokens.",
    )


def noise_x(ctx: StepContext, config: PerturbationConfig, sigma: float) -> torch.Tensor:
    """σ·N(0, I) drawn in the config's target space, as the perturbation of x it amounts to (zero on padding).
    A per-coordinate size, so a relative σ is resolved like a sign/L∞ radius."""
    space = PerturbationSpace(ctx, config.target)
    return space.to_x(space.gaussian(config.resolve_norm(ctx, sigma, "linf")))


@register
class GaussianNoise(Strategy):
    config_class = GaussianNoiseConfig
    summary = "train on L(x + σ·N(0, I)) ≈ L + ½σ²·ΔL"
    accumulation = accumulation_note(
        "split-invariant for the same noise draws (noise per coordinate, a mean loss).",
        "the same in expectation, not per draw: a token in two micro-batches gets two independent noise draws "
        "where the whole batch would give it one.",
    )
    config: GaussianNoiseConfig

    def cost(self) -> StepCost:
        return StepCost(forward=1, backward=1)

    def training_step(self, ctx: StepContext) -> StepResult:
        x = ctx.embed()
        if self.config.sigma > 0:
            # Skipped at σ = 0 so the random stream, hence the dropout masks, match the baseline's exactly.
            x = x + noise_x(ctx, self.config, self.config.sigma).to(x.dtype)
        loss = ctx.loss(ctx.forward(x))
        ctx.backward(loss)
        return StepResult(loss.detach())
