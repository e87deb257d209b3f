"""FGM / FGSM: one ascent step on the embeddings, then train on the perturbed input.

r = ε·g/‖g‖ (`norm: l2`, FGM) or ε·sign(g) (`norm: sign`, FGSM), g = ∇ₓL. The update uses either the
adversarial loss's gradient alone (`adversarial_only`, what the study's Keras code does: add r, take the
normal training step, remove r) or clean + adversarial gradients (`sum`, the common PyTorch snippet).

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


class FGMConfig(PerturbationConfig):
    name: Literal["fgm"] = Field("fgm", description="Fast gradient method (one-step adversarial training).")
    epsilon: float = Field(
        0.5,
        ge=0,
        description="Perturbation size ε. The study's FGM is ε = 0.5 with target: embedding_matrix and combine: "
        "adversarial_only, not these defaults: configs/<task>/study-fgm.yaml.",
    )
    norm: Literal["l2", "sign"] = Field("l2", description="`l2`: r = ε·g/‖g‖ (FGM); `sign`: r = ε·sign(g) (FGSM).")
    combine: Literal["adversarial_only", "sum"] = Field(
        "sum",
        description="`adversarial_only`: update on ∇θL(x + r) alone (the study's code); "
        "`sum`: update on ∇θL(x) + ∇θL(x + r) (the usual PyTorch FGM snippet).",
    )


@register
class FGM(Strategy):
    config_class = FGMConfig
    summary = "one adversarial step r = ε·g/‖g‖ (or ε·sign g) on the embeddings"
    accumulation = accumulation_note(
        "split-invariant (the step is per example, ε·ĝ_b or ε·sign g_b; both losses are means).",
        "NOT split-invariant: each micro-batch steps along its own ∇_E (ε·G_k/‖G_k‖ over the rows it uses, or "
        "ε·sign G_k), not along the whole batch's.",
    )
    config: FGMConfig

    def cost(self) -> StepCost:
        return StepCost(forward=2, backward=2)

    def perturbation(self, ctx: StepContext, space: PerturbationSpace, g_x: torch.Tensor) -> torch.Tensor:
        """r in target space from ∇ₓL (exposed so tests can check its norm and direction)."""
        g = space.from_x_grad(g_x.detach())
        # resolve_norm: a relative ε for `sign` is per coordinate, so ‖r‖₂ = ε·‖x‖ as for `l2`.
        epsilon = self.config.resolve_norm(ctx, self.config.epsilon, self.config.norm)
        return epsilon * space.direction(g, self.config.norm)

    def training_step(self, ctx: StepContext) -> StepResult:
        space = PerturbationSpace(ctx, self.config.target)
        x = ctx.embed()
        clean_loss = ctx.loss(ctx.forward(x))
        if self.config.combine == "sum":
            x.retain_grad()
            ctx.backward(clean_loss)
            g_x = x.grad
        else:
            g_x = ctx.grad(clean_loss, x)
        r = self.perturbation(ctx, space, g_x)
        return train_on_perturbed(ctx, space, r, clean_loss)
