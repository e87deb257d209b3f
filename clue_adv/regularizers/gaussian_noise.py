"""Gaussian noise on the word embeddings: train on L(x + σξ), ξ ~ N(0, I).

By Taylor, E[L(x + σξ)] ≈ L(x) + ½σ²·tr ∇ₓ²L: the study's "noise ≈ loss + ½σ²ΔL" curvature penalty.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from clue_adv.regularizers import register
from clue_adv.regularizers.base import StepContext, StepCost, StepResult, Strategy, StrategyConfig


class GaussianNoiseConfig(StrategyConfig):
    name: Literal["gaussian_noise"] = Field("gaussian_noise", description="Gaussian noise on embeddings.")
    sigma: float = Field(
        0.01,
        ge=0,
        description="Std of the noise added to each word-embedding coordinate (absolute units; "
        "bert-base-chinese embedding coordinates have std ≈ 0.05, a random-init BERT's 0.02).",
    )


@register
class GaussianNoise(Strategy):
    config_class = GaussianNoiseConfig
    summary = "train on L(x + σ·N(0, I)) ≈ L + ½σ²·ΔL"

    def cost(self) -> StepCost:
        return StepCost(forward=1, backward=1)

    def training_step(self, ctx: StepContext) -> StepResult:
        x = ctx.embed()
        if self.config.sigma > 0:
            # Skipped at σ = 0 so the random stream, hence the dropout masks, match the baseline's exactly.
            x = x + torch.randn_like(x) * self.config.sigma * ctx.mask.to(x.dtype)
        loss = ctx.loss(ctx.forward(x))
        ctx.backward(loss)
        return StepResult(loss.detach())
