"""FreeLB (Zhu et al., ICLR 2020): K ascent steps whose passes also train the model ("free" gradients).

Step t = 0 … K−1: one forward at x + δ_t and ONE backward of L(x + δ_t)/K. That backward accumulates
∇θ into the parameters (so after K steps `.grad` holds the average of the K per-step gradients) and
gives ∇_δ for the ascent δ_{t+1} = Π(δ_t + adv_lr·g/‖g‖₂) (Π: L2 projection onto ‖δ‖ ≤ max_norm, none
when max_norm = 0). The last step's ∇_δ is not used. Cost: K forward, K backward.

Random init as the paper's code does it: δ₀ uniform in [−1, 1] on real tokens, scaled per example by
init_magnitude/√(n_i·H) (n_i real tokens), so E‖δ₀‖₂ ≈ init_magnitude/√3; for the embedding-matrix
target the same with n·H = used rows × H. δ₀ is projected when max_norm > 0 (the paper's code does not;
it only matters when init_magnitude > max_norm).

Dropout: with `same_dropout_mask` (default) every step draws the same masks: steps 0 … K−2 run inside
`same_dropout` (torch.random.fork_rng: the RNG state of the CPU and the batch's CUDA device is restored
after each), and the last step then draws the same masks and advances the RNG as one ordinary forward would.

The loss returned for logging is the mean of the K losses (FreeLB's objective; there is no clean pass).

Gradient accumulation: split-invariant with `embedding_output`, NOT with `embedding_matrix`, whose single norm
is taken over the rows each micro-batch uses (`accumulation` below; StepContext has the rule).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from clue_adv.regularizers import register
from clue_adv.regularizers.base import StepContext, StepCost, StepResult, Strategy
from clue_adv.regularizers.perturb import (
    PerturbationConfig,
    PerturbationSpace,
    Size,
    accumulation_note,
    same_dropout,
)


class FreeLBConfig(PerturbationConfig):
    name: Literal["freelb"] = Field("freelb", description="FreeLB: K ascent steps whose gradients are averaged.")
    steps: int = Field(3, ge=1, description="Ascent steps K; each is one forward and one backward (cost K, K).")
    adv_lr: float = Field(0.1, ge=0, description="Ascent step size: δ ← δ + adv_lr·g/‖g‖₂ (embedding units).")
    init_magnitude: float = Field(
        0.6,
        ge=0,
        description="Random init: uniform[−1, 1]·init_magnitude/√(n·H) per example (n real tokens), as the FreeLB "
        "code; 0 starts from δ = 0.",
    )
    max_norm: float = Field(
        0.0, ge=0, description="L2 radius δ is projected onto after each step (per example); 0 = unbounded."
    )
    same_dropout_mask: bool = Field(
        True, description="Reuse the same dropout masks in all K passes (the FreeLB paper's recommendation)."
    )


@register
class FreeLB(Strategy):
    config_class = FreeLBConfig
    summary = "K ascent steps, parameter gradient averaged over the K passes (each loss / K)"
    accumulation = accumulation_note(
        "split-invariant for the same δ₀ (init, steps and projection are per example; losses are means).",
        "NOT split-invariant: each micro-batch ascends along its own ∇_E and projects with one norm over the rows "
        "it uses, not the whole batch's.",
    )
    config: FreeLBConfig

    #: set to True to keep δ₀ … δ_{K−1} (target space, detached) and the K losses after a step
    keep_iterates: bool = False

    def __init__(self, config: FreeLBConfig) -> None:
        super().__init__(config)
        self.iterates: list[torch.Tensor] = []
        self.step_losses: list[float] = []

    def cost(self) -> StepCost:
        k = self.config.steps
        note = "same dropout mask in all steps" if self.config.same_dropout_mask else ""
        return StepCost(forward=k, backward=k, note=note)

    def initial_delta(self, space: PerturbationSpace, magnitude: Size) -> torch.Tensor:
        """δ₀ in target space (fp32), zero on padding."""
        if self.config.init_magnitude == 0:  # the config's value: a relative magnitude is a device tensor
            return space.zeros()
        delta = torch.rand(space.target_shape, device=space.mask.device) * 2 - 1
        if space.target == "embedding_output":
            delta = delta * space.mask
        return delta * space.per_unit(magnitude / space.real_sizes().sqrt())

    def training_step(self, ctx: StepContext) -> StepResult:
        cfg = self.config
        space = PerturbationSpace(ctx, cfg.target)
        unit = cfg.resolve(ctx, 1.0)
        adv_lr, max_norm = cfg.adv_lr * unit, cfg.max_norm * unit

        delta = self.initial_delta(space, cfg.init_magnitude * unit)
        if cfg.max_norm > 0:
            delta = space.project(delta, max_norm, "l2")
        losses: list[torch.Tensor] = []
        self.iterates = []
        for step in range(cfg.steps):
            if self.keep_iterates:
                self.iterates.append(delta.detach())
            last = step == cfg.steps - 1
            delta = delta.detach().requires_grad_(True)
            with same_dropout(ctx, cfg.same_dropout_mask and not last):
                x = ctx.embed()  # fresh graph: the previous backward freed the last one
                loss = ctx.loss(ctx.forward(x + space.to_x(delta).to(x.dtype)))
                ctx.backward(loss / cfg.steps)
            losses.append(loss.detach())
            if last:
                break
            # δ.grad carries the 1/K and loss scale; the L2 direction does not care.
            delta = delta.detach() + adv_lr * space.direction(delta.grad, "l2")
            if cfg.max_norm > 0:
                delta = space.project(delta, max_norm, "l2")

        self.step_losses = [float(v) for v in losses] if self.keep_iterates else []  # for tests: syncs
        delta = delta.detach()
        return StepResult(
            torch.stack(losses).mean(),
            {
                "adv_loss": losses[-1],
                "first_step_loss": losses[0],
                "perturbation_norm": space.norms(delta).mean(),
                "special_token_share": space.special_token_share(delta),
            },
        )
