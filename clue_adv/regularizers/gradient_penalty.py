"""Gradient penalty on the embeddings: L + ½ε‖∇ₓL‖² (the study's), ε‖∇ₓL‖, or a finite difference of it.

g = ∇ₓL is the gradient of the batch-mean cross-entropy with respect to x. For `embedding_output`, x is
each token's word-embedding output and ‖g‖² sums over every real token of every example (the study's
Keras code squares the per-token rows of the embedding gradient and sums them). For `embedding_matrix`,
g = ∇_E L sums each token's rows over its occurrences, and ‖g‖² is over the used rows of E.

Modes (the parameter gradient each one leaves in `.grad`):

* `exact`: ∇θ(L + ½ε‖g‖²). g comes from a backward with `create_graph=True`, then one backward of the
  total runs through it: the double backward, so the model needs eager attention (no fused SDPA).
* `normalized`: ∇θ(L + ε·N(g)), N(g) = Σ_b ‖g_b‖ (per-example L2 norms summed over the batch) for
  `embedding_output`, ‖g‖ (one global norm) for `embedding_matrix`: exactly the first-order value of FGM-L2
  with the same ε and target, since L(x + εĝ) ≈ L + ε·N(g). FGM with `combine: adversarial_only` therefore
  has the gradient of this mode to first order; with `combine: sum` its gradient is ≈ ∇θ(2L + ε·N(g)).
  Also a double backward.
* `finite_difference`: no double backward. Write J v = d/dt ∇θL(θ, x(θ) + t·v) at t = 0 for a fixed v; it
  includes the path through x(θ) when the embedding weights are trained. Then ∇θ ½ε‖g‖² = ε·J g, and

      J g ≈ [∇θL(x + hεg) − ∇θL(x)] / (hε)   ⇒   ∇θ(L + ½ε‖g‖²) ≈ (1 − 1/h)·∇θL(x) + (1/h)·∇θL(x + hεg).

  The penalty is ½ε‖g‖² over the whole batch tensor (= ½ε Σ_b ‖g_b‖²), so stepping along the whole
  g (one global direction, length hε‖g‖) is exact to first order; per-example directions would need one
  pass per example. In terms of a step of length s along ĝ (docs/REGULARIZERS.md) this is s = hε‖g‖ and
  ε‖g‖/s = 1/h. The step is stated relative to εg so that both weights are known before the first
  backward: pass 1 puts (1 − 1/h)·∇θL(x) into `.grad` and yields g on the way; pass 2 adds
  (1/h)·∇θL(x + hεg). An absolute step would need ‖g‖ before pass 1's weight is known, i.e. a third
  backward or editing `.grad` by hand. h = 1 is the study's own equivalence (its eq. 15): training on
  L(x + εg) alone, i.e. FGM with the unnormalised step εg. Both passes use the same dropout mask (the
  random state is replayed), else the difference would be dominated by the change of mask.

  Both passes run in fp32 whatever the run's precision (`StepContext.full_precision`): their difference is divided
  by h, and the step hεg is a fraction of one bf16 step of the activations unless hε is large (measured at BERT-base
  width under bf16 autocast: the penalty's share of the parameter gradient had cosine 0.33 with fp32's at ε = 0.01,
  0.78 with `fd_step: unit` at h = 0.01). Cost on a GPU under bf16: the step at fp32 speed (fused SDPA still works).

  `fd_step: unit` is docs/REGULARIZERS.md's form instead: the second pass at x + h·ĝ (ĝ = g/‖g‖ over the whole
  target tensor), so h is the step's length in embedding units whatever the gradient's scale, and

      ∇θ(L + ½ε‖g‖²) ≈ (1 − c)·∇θL(x) + c·∇θL(x + hĝ),   c = ε‖g‖/h.

  c is known only after pass 1, so pass 1 adds ∇θL(x) with weight 1 and its contribution to `.grad` is then
  rescaled in place: .grad ← (1 − c)·.grad + c·(.grad before pass 1). No third pass; the price is one copy
  of the parameter gradients when `.grad` already holds earlier micro-batches (gradient accumulation).

Gradient accumulation (StepContext's rule). The penalty is the WINDOW's: g above is the gradient of the
window's mean loss, which on micro-batch k's x is s·g_k (s = loss_scale = b_k/B, g_k the micro-batch's own
gradient). With `embedding_output` each example's x is its own, so ‖g‖² = Σ_k s²‖g_k‖² and the window's
½ε‖g‖² is the sum of per-micro-batch terms ½ε·s²‖g_k‖²: micro-batch k's objective (which `backward` scales
by s) is L_k + ½(ε·s)‖g_k‖², and the window's gradient is the same for 8 = 4+4 = 4+2+2 examples. In the
finite differences that is ε·s in place of ε: `scaled` steps to x + hε·s·g_k (the window's step, the same
point for every split), `unit` weighs its second pass by c = ε·s‖g_k‖/h (its step has length h per
micro-batch, so only the O(h) error depends on the split). `normalized` is of degree 1 in g: ε·Σ_b‖s·g_kb‖/s
= ε·Σ_b‖g_kb‖, unchanged. The logged `gradient_penalty` is the term in micro-batch k's objective (the
window's penalty is their s-weighted sum, as its loss is); `input_grad_norm` is ‖g_k‖.
With `embedding_matrix` the rows of E are shared between micro-batches, and the window's ½ε‖Σ_k s·G_k‖²
(ε‖Σ_k s·G_k‖ for `normalized`) cannot be computed one micro-batch at a time: each contributes ½ε‖s·G_k‖²
(ε·s‖G_k‖). The squared penalty loses the window's cross terms ε·Σ_{k<l}⟨s_k·G_k, s_l·G_l⟩ (equal when
micro-batches share no token; otherwise off by those terms, largest for rows every example uses: [CLS],
[SEP]); the normalized one is never smaller than the window's (triangle inequality).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from clue_adv.regularizers import register
from clue_adv.regularizers.base import StepContext, StepCost, StepResult, Strategy, StrategyConfig, Target
from clue_adv.regularizers.perturb import PerturbationSpace, same_dropout

Mode = Literal["exact", "normalized", "finite_difference"]
FdStep = Literal["scaled", "unit"]


class GradientPenaltyConfig(StrategyConfig):
    name: Literal["gradient_penalty"] = Field(
        "gradient_penalty", description="Gradient penalty on the embeddings (the study's GP)."
    )
    target: Target = Field(
        "embedding_output",
        description="`embedding_output`: g = ∇ₓL per token, ‖g‖² summed over the real tokens of the batch (the "
        "study). `embedding_matrix`: g = ∇_E L over the used rows of the word-embedding matrix (occurrences of a "
        "token summed into its row).",
    )
    epsilon: float = Field(
        1.0,
        ge=0,
        description="ε: weight of ½ε‖g‖² (`exact`, `finite_difference`; the study: 1) or of ε·Σ‖g_b‖ "
        "(`normalized`, where ε plays FGM's radius).",
    )
    mode: Mode = Field(
        "exact",
        description="`exact`: L + ½ε‖g‖² by double backward. `normalized`: L + ε·Σ_b‖g_b‖ (per-example norms; "
        "one global norm for the matrix), FGM-L2's first-order equal, also double backward. "
        "`finite_difference`: the gradient of L + ½ε‖g‖² from two ordinary passes, "
        "(1 − 1/h)·∇θL(x) + (1/h)·∇θL(x + hεg); works with fused SDPA attention.",
    )
    h: float = Field(
        0.1,
        gt=0,
        description="`finite_difference` only: the second pass runs at x + h·ε·g. Error = truncation O(h) + the "
        "passes' round-off amplified by 1/h. Measured on a tiny random-init BERT (embedding_output): 1% at h = 0.1 "
        "and 0.1% at 0.01 in fp32 (6% and 60% in bf16, which is why both passes run in fp32 under bf16 autocast). "
        "h = 1 trains on L(x + εg) alone (the study's eq. 15). With `fd_step: unit`, h is the step's length along ĝ "
        "instead.",
    )
    fd_step: FdStep = Field(
        "scaled",
        description="`finite_difference` only: where the second pass runs. `scaled`: x + h·ε·g (both passes' "
        "weights known up front; h's default was measured for it). `unit`: x + h·ĝ, ĝ = g/‖g‖ over the batch "
        "(docs/REGULARIZERS.md's form: h is a length in embedding units, independent of the gradient's scale); "
        "costs one copy of the parameter gradients under gradient accumulation, no extra pass.",
    )


@register
class GradientPenalty(Strategy):
    config_class = GradientPenaltyConfig
    summary = "L + ½ε‖∇ₓL‖² (exact double backward), ε‖∇ₓL‖ (normalized), or a 2-pass finite difference"
    accumulation = (
        "embedding_output: the penalty is on the gradient of the window's mean loss, so splitting a batch into "
        "micro-batches changes nothing (exact, normalized, finite_difference `scaled`; `unit` up to its O(h) "
        "error, its step being h per micro-batch). embedding_matrix: NOT split-invariant. E's rows are shared "
        "between micro-batches, and each micro-batch penalises its own part of ∇_E: ½ε‖g‖² loses the cross terms "
        "between micro-batches (equal only when they share no token) and ε‖g‖ is never smaller than the whole "
        "batch's."
    )
    config: GradientPenaltyConfig

    def cost(self) -> StepCost:
        if self.config.mode == "finite_difference":
            return StepCost(
                forward=2,
                backward=2,
                note=f"2nd pass at x + {'hεg' if self.config.fd_step == 'scaled' else 'hĝ'} with the 1st pass's "
                "dropout mask; no double backward; both passes in fp32 under bf16 autocast",
            )
        return StepCost(
            forward=1,
            backward=2,
            double_backward=True,
            note="backward 1 is ∇ₓL with create_graph; backward 2 runs through it (the double backward)",
        )

    def penalty(self, ctx: StepContext, space: PerturbationSpace, g: torch.Tensor) -> torch.Tensor:
        """The term added to this micro-batch's L, from its g (target space): the window's penalty, on the window's
        gradient, per unit of the micro-batch's share (`backward` multiplies it back; module docstring)."""
        g_window = ctx.window_grad(g)
        if self.config.mode == "normalized":
            return self.config.epsilon * space.norms(g_window).sum() / ctx.loss_scale
        return 0.5 * self.config.epsilon * space.squared_norm_sum(g_window) / ctx.loss_scale

    def training_step(self, ctx: StepContext) -> StepResult:
        space = PerturbationSpace(ctx, self.config.target)
        if self.config.mode == "finite_difference":
            # Both passes in fp32 (module docstring): their difference is divided by h, and at small hε (or h) the
            # step is a fraction of one bf16 step of the activations.
            with ctx.full_precision():
                return self._finite_difference_step(ctx, space)
        x = ctx.embed()
        loss = ctx.loss(ctx.forward(x))
        g = space.from_x_grad(ctx.grad(loss, x, create_graph=True))
        penalty = self.penalty(ctx, space, g)
        ctx.backward(loss + penalty)
        return StepResult(loss.detach(), _metrics(space, g.detach(), penalty.detach()))

    def _finite_difference_step(self, ctx: StepContext, space: PerturbationSpace) -> StepResult:
        if self.config.fd_step == "unit":
            return self._unit_step(ctx, space)
        h, epsilon = self.config.h, self.config.epsilon
        x = ctx.embed()
        with same_dropout(ctx):  # the second pass draws the same masks
            loss = ctx.loss(ctx.forward(x))
        clean_weight = 1.0 - 1.0 / h
        if clean_weight == 0.0:
            g_x = ctx.grad(loss, x)
        else:
            # One backward gives both ∇θL (weighted, into .grad) and g (unweighted below).
            x.retain_grad()
            ctx.backward(clean_weight * loss)
            g_x = x.grad / (clean_weight * ctx.loss_scale)
        g = space.from_x_grad(g_x.detach())
        # ε·loss_scale·g, the window's step (module docstring): the penalty weighs ε·loss_scale in this objective.
        step = space.to_x(h * epsilon * ctx.window_grad(g)).to(x.dtype)
        shifted_loss = ctx.loss(ctx.forward(ctx.embed() + step))
        ctx.backward(shifted_loss / h)
        metrics = _metrics(space, g, self.penalty(ctx, space, g))
        metrics["shifted_loss"] = shifted_loss.detach()
        return StepResult(loss.detach(), metrics)

    def _unit_step(self, ctx: StepContext, space: PerturbationSpace) -> StepResult:
        """The second pass at x + h·ĝ; see the module docstring for the in-place reweighting of pass 1."""
        h, epsilon = self.config.h, self.config.epsilon
        params = [p for p in ctx.model.parameters() if p.requires_grad]
        # .grad before pass 1 (earlier micro-batches), copied in one fused call; none without accumulation
        earlier = [p for p in params if p.grad is not None]
        before = torch._foreach_mul([p.grad for p in earlier], 1.0) if earlier else []
        x = ctx.embed()
        with same_dropout(ctx):  # the second pass draws the same masks
            loss = ctx.loss(ctx.forward(x))
        x.retain_grad()
        ctx.backward(loss)
        g = space.from_x_grad(x.grad.detach() / ctx.loss_scale)  # x.grad holds loss_scale·g
        norm = space.squared_norm_sum(g).sqrt()
        # c = ε·loss_scale·‖g‖/h: the penalty weighs ε·loss_scale in this micro-batch's objective (module docstring).
        # A 0-dim tensor: read on the host it would wait for the GPU to finish pass 1.
        c = epsilon * space.squared_norm_sum(ctx.window_grad(g)).sqrt() / h
        with torch.no_grad():
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, 1.0 - c)  # this pass's ∇θL(x) now weighs 1 − c ...
            if earlier:  # ... and earlier micro-batches' gradients keep weight 1
                torch._foreach_mul_(before, c)
                torch._foreach_add_([p.grad for p in earlier], before)
        # A zero gradient has no direction: then ĝ = 0/tiny = 0, c = 0 and the second pass adds nothing (it still
        # runs, so the step's passes are what cost() says).
        direction = g / norm.clamp_min(torch.finfo(norm.dtype).tiny)
        shifted_loss = ctx.loss(ctx.forward(ctx.embed() + space.to_x(h * direction).to(x.dtype)))
        ctx.backward(c * shifted_loss)
        metrics = _metrics(space, g, self.penalty(ctx, space, g))
        metrics["shifted_loss"] = shifted_loss.detach()
        return StepResult(loss.detach(), metrics)


def _metrics(space: PerturbationSpace, g: torch.Tensor, penalty: torch.Tensor) -> dict[str, torch.Tensor | float]:
    return {
        "gradient_penalty": penalty.detach(),
        "input_grad_norm": space.squared_norm_sum(g.detach()).sqrt(),
        "special_token_share": space.special_token_share(g),
    }
