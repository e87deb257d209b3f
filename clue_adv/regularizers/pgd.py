"""PGD: K projected ascent steps on the embeddings (Madry et al. 2018), then train on the result.

r₀ = 0 (or uniform in the ball with `random_start`), r_{k+1} = Π_ε(r_k + α·ĝ(x + r_k)) with ĝ = g/‖g‖
(`l2`) or sign(g) (`linf`), Π_ε the projection onto the ε-ball after every step.

Gradient accumulation (the common PyTorch snippet): the update uses ∇θL(x) + ∇θL(x + r_K), the clean
gradient plus the last adversarial step's. The clean backward also yields ∇ₓL(x), the first ascent
direction when r₀ = 0; the intermediate steps take only ∇ᵣ with `ctx.grad`, so parameter `.grad` holds
exactly those two terms. Cost: K+1 forward, K+1 backward (one more of each with `random_start`, which
needs ∇ₓ at x + r₀). With K = 1, α = ε (L2) and r₀ = 0 this is FGM with `combine: sum`.

Gradient accumulation: split-invariant with `embedding_output`, NOT with `embedding_matrix`, whose single norm
is taken over the rows each micro-batch uses (`accumulation` below; StepContext has the rule).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from clue_adv.regularizers import register
from clue_adv.regularizers.base import StepContext, StepCost, StepResult, Strategy
from clue_adv.regularizers.perturb import PerturbationConfig, PerturbationSpace, accumulation_note, train_on_perturbed


class PGDConfig(PerturbationConfig):
    name: Literal["pgd"] = Field("pgd", description="Projected gradient descent adversarial training (K steps).")
    steps: int = Field(3, ge=1, description="Ascent steps K (cost: K+1 forward and backward passes).")
    epsilon: float = Field(1.0, ge=0, description="Radius ε of the ball the perturbation is projected onto.")
    alpha: float = Field(0.3, ge=0, description="Step size α of each ascent step (same unit as ε).")
    norm: Literal["l2", "linf"] = Field(
        "l2",
        description="`l2`: step α·g/‖g‖, ball ‖r‖₂ ≤ ε (per example, or over the used embedding rows); "
        "`linf`: step α·sign(g), ball |r| ≤ ε elementwise.",
    )
    random_start: bool = Field(
        False, description="Start from a uniform point in the ball instead of r₀ = 0 (costs one more pass of each)."
    )


@register
class PGD(Strategy):
    config_class = PGDConfig
    summary = "K projected ascent steps r ← Π_ε(r + α·ĝ); update on ∇θL(x) + ∇θL(x + r_K)"
    accumulation = accumulation_note(
        "split-invariant for the same random start (steps, balls and starts are per example; losses are means).",
        "NOT split-invariant: each micro-batch ascends along its own ∇_E and projects with one norm over the rows "
        "it uses, not the whole batch's.",
    )
    config: PGDConfig

    #: set to True to keep every iterate r₀ … r_K (target space, detached) in `iterates` after a step
    keep_iterates: bool = False

    def __init__(self, config: PGDConfig) -> None:
        super().__init__(config)
        self.iterates: list[torch.Tensor] = []

    def cost(self) -> StepCost:
        passes = self.config.steps + 1 + int(self.config.random_start)
        note = "random start: +1 forward/backward for ∇ at x + r₀" if self.config.random_start else ""
        return StepCost(forward=passes, backward=passes, note=note)

    def training_step(self, ctx: StepContext) -> StepResult:
        cfg = self.config
        space = PerturbationSpace(ctx, cfg.target)
        unit = cfg.resolve_norm(ctx, 1.0, cfg.norm)  # one embedding-scale lookup for both ε and α
        epsilon, alpha = cfg.epsilon * unit, cfg.alpha * unit

        x = ctx.embed()
        x.retain_grad()
        clean_loss = ctx.loss(ctx.forward(x))
        ctx.backward(clean_loss)

        if cfg.random_start:
            r = space.random(epsilon, cfg.norm)
            g = self._input_grad(ctx, space, x, r)
        else:
            r = space.zeros()
            g = space.from_x_grad(x.grad)
        self.iterates = [r.detach()] if self.keep_iterates else []
        for step in range(cfg.steps):
            r = space.project(r + alpha * space.direction(g, cfg.norm), epsilon, cfg.norm)
            if self.keep_iterates:
                self.iterates.append(r.detach())
            if step < cfg.steps - 1:
                g = self._input_grad(ctx, space, x, r)

        return train_on_perturbed(ctx, space, r, clean_loss)

    @staticmethod
    def _input_grad(ctx: StepContext, space: PerturbationSpace, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        """∇ᵣL(x + r) in target space; parameter `.grad` is not touched."""
        r = r.detach().requires_grad_(True)
        loss = ctx.loss(ctx.forward(x.detach() + space.to_x(r).to(x.dtype)))
        return ctx.grad(loss, r)
