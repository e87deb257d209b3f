"""Gaussian noise on the word embeddings: train on L(x + σξ), ξ ~ N(0, I).

By Taylor, E[L(x + σξ)] ≈ L(x) + ½σ²·tr ∇ₓ²L: the study's "noise ≈ loss + ½σ²ΔL" curvature penalty.

Gradient accumulation: split-invariant with `embedding_output` (for the same draws); with `embedding_matrix`
only in expectation (`accumulation` below; StepContext has the rule).

Two refinements the study's equations call for: `samples: k` averages the loss over k draws (its eq. 4, a
better estimate of the expected noisy loss), and `antithetic: true` uses each draw twice, as ξ and −ξ with the
same dropout masks: ½[L(x + σξ) + L(x − σξ)] = L + ½σ²·ξᵀ∇ₓ²L·ξ + O(σ⁴) per example, so the first-order term
σ·ξ·∇ₓL (mean zero, but most of a single draw's variance) cancels exactly and only the curvature term of its
eq. 5 remains.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from clue_adv.regularizers import register
from clue_adv.regularizers.base import StepContext, StepCost, StepResult, Strategy
from clue_adv.regularizers.perturb import PerturbationConfig, PerturbationSpace, accumulation_note, same_dropout


class GaussianNoiseConfig(PerturbationConfig):
    name: Literal["gaussian_noise"] = Field("gaussian_noise", description="Gaussian noise on embeddings.")
    sigma: float = Field(
        0.01,
        ge=0,
        description="Std of the noise added to each coordinate of the target (absolute: embedding units; "
        "bert-base-chinese embedding coordinates have std ≈ 0.05, a random-init BERT's 0.02; relative: a fraction "
        "of the typical coordinate ‖x‖/√n). With `embedding_matrix` one draw per used row, shared by its tokens.",
    )
    samples: int = Field(
        1,
        ge=1,
        description="Noise draws per example; the loss is their average (the study's eq. 4, a closer estimate of "
        "E[L(x + σξ)]), at k forward and backward passes per step. 1: the usual single draw.",
    )
    antithetic: bool = Field(
        False,
        description="Use every draw twice, as +σξ and −σξ with the same dropout masks: the first-order term σ·ξ·∇ₓL "
        "cancels exactly per example and ½σ²·ξᵀ∇ₓ²L·ξ remains (the study's eq. 5). Doubles the passes.",
    )

    @property
    def passes(self) -> int:
        """Forward (and backward) passes per step: one per draw, two with `antithetic`."""
        return self.samples * (2 if self.antithetic else 1)


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
        passes = self.config.passes
        note = ""
        if passes > 1:
            pair = " (antithetic pairs ±ξ, same dropout masks)" if self.config.antithetic else ""
            note = f"{self.config.samples} noise draw(s){pair}, one forward/backward each"
        return StepCost(forward=passes, backward=passes, note=note)

    def training_step(self, ctx: StepContext) -> StepResult:
        if self.config.passes > 1 and self.config.sigma > 0:
            return self._averaged_step(ctx)
        x = ctx.embed()
        if self.config.sigma > 0:
            # Skipped at σ = 0 so the random stream, hence the dropout masks, match the baseline's exactly.
            x = x + noise_x(ctx, self.config, self.config.sigma).to(x.dtype)
        loss = ctx.loss(ctx.forward(x))
        ctx.backward(loss)
        return StepResult(loss.detach())

    def _averaged_step(self, ctx: StepContext) -> StepResult:
        """The gradient of the average noisy loss over the draws (±ξ pairs with `antithetic`): one forward and
        backward per term, each scaled by 1/passes, so memory stays that of one pass."""
        cfg = self.config
        passes = cfg.passes
        total = 0.0
        for _ in range(cfg.samples):
            noise = noise_x(ctx, cfg, cfg.sigma)
            signs = (1.0, -1.0) if cfg.antithetic else (1.0,)
            for sign in signs:
                # The pair's first pass restores the RNG after it, so −ξ sees the masks +ξ saw: with different
                # dropout masks the first-order terms would not cancel.
                with same_dropout(ctx, enabled=sign > 0 and cfg.antithetic):
                    x = ctx.embed()
                    loss = ctx.loss(ctx.forward(x + (sign * noise).to(x.dtype)))
                    ctx.backward(loss / passes)
                total = total + loss.detach() / passes
        return StepResult(total)
