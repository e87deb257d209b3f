"""VAT: virtual adversarial training (Miyato et al., TPAMI 2018; for text: Miyato et al., ICLR 2017).

Loss = CE(x) + α·KL(f(x) ‖ f(x + r)), f(x) detached, r = ε·d̂. d approximates the dominant eigenvector
of the Hessian H of d ↦ KL(f(x) ‖ f(x + d)) at d = 0 by power iteration: from a random d,
d ← ∇_d KL(f(x) ‖ f(x + ξ·d̂)) ≈ ξ·H·d̂ (the KL and its gradient vanish at d = 0), normalised, `iterations`
times. The regularizer needs no labels. Cost with one iteration: 3 forward (clean, ξ-probe, x + r),
2 backward (∇_d by `ctx.grad`, then one backward of CE + α·KL into the parameters).

Dropout: with `same_dropout_mask` (default) the clean pass, the probes and the adversarial pass share one
set of dropout masks, so KL(f(x) ‖ f(x + ξd)) is 0 at d = 0 and its gradient really is ξ·H·d; with fresh
masks (as most reference code runs it) the probe's gradient is dominated by the dropout disagreement, which
does not shrink with ξ, and the VAT term adds an R-Drop-like term that does not shrink with ε.

Numerics: d is normalised in fp32 after dividing by its max-abs entry, so squaring tiny fp16/bf16-born
gradient entries cannot underflow to a zero norm (the NaN pitfall of normalising in half precision).

Precision: the probes run in fp32 whatever the run's precision (`StepContext.full_precision`). ξ = 1e-3 is far
below one bf16 step of the activations (relative 2⁻⁸ of a coordinate ≈ 0.05 in pretrained BERT), so under bf16
autocast KL(f(x) ‖ f(x + ξd)) is rounding noise: measured at BERT-base width, the bf16 probe gradient had cosine
−0.01 with fp32's at ξ = 1e-3, and VAT's share of the parameter gradient cosine ≈ 0.4. The probes' reference f(x)
must come from an fp32 pass too (a bf16 f(x) is not the fp32 f(x + 0), and the gradient of that mismatch would
swamp ξ·H·d), so under bf16 a step runs one more forward (no grad). The clean and adversarial passes keep the
run's precision: r = ε·d̂ is a real perturbation, like FGM's. Cost on a GPU under bf16: the probes run at fp32 speed.

Gradient accumulation: split-invariant with `embedding_output`, NOT with `embedding_matrix`, whose single norm
is taken over the rows each micro-batch uses (`accumulation` below; StepContext has the rule).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from clue_adv.regularizers import register
from clue_adv.regularizers.base import StepContext, StepCost, StepResult, Strategy
from clue_adv.regularizers.perturb import PerturbationConfig, PerturbationSpace, accumulation_note, same_dropout

Normalize = Callable[[torch.Tensor], torch.Tensor]
Grad = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Batch-mean KL(p ‖ q) from logits, in fp32; gradients flow into whichever argument is not detached."""
    log_p = F.log_softmax(p_logits.float(), dim=-1)
    log_q = F.log_softmax(q_logits.float(), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def unit_l2(v: torch.Tensor) -> torch.Tensor:
    """v/‖v‖₂ over the whole tensor, computed safely in fp32 or wider (pre-scaled by max |v|)."""
    v = v.to(torch.promote_types(v.dtype, torch.float32))
    v = v / v.abs().amax().clamp_min(torch.finfo(v.dtype).tiny)
    return v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)


def unit_direction(space: PerturbationSpace, v: torch.Tensor) -> torch.Tensor:
    """v/‖v‖₂ per unit of `space` (per example, or one for the matrix), in fp32 or wider, pre-scaled by each
    unit's max |v| so that tiny half-precision-born entries cannot underflow to a zero norm."""
    v = v.to(torch.promote_types(v.dtype, torch.float32))
    v = v / space.per_unit(space.linf_norms(v).clamp_min(torch.finfo(v.dtype).tiny))
    return space.direction(v, "l2")


def _autograd_grad(output: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(output, inputs)
    return g


def power_iteration(
    kl: Callable[[torch.Tensor], torch.Tensor],
    d: torch.Tensor,
    *,
    xi: float,
    iterations: int,
    normalize: Normalize = unit_l2,
    grad: Grad = _autograd_grad,
    trace: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Unit direction of the dominant eigenvector of the Hessian of `kl` at 0, by power iteration.

    `kl(v)` is the divergence at perturbation v (0 at v = 0, minimum there); each iteration takes
    ∇_d kl(ξ·d) ≈ ξ·H·d, so `iterations` steps multiply the start by Hᵏ (up to normalisation).
    `grad(output, input)` defaults to autograd; VAT passes `ctx.grad` so the passes are counted and the
    parameters' `.grad` is untouched. `trace`, when given, receives every unit iterate d̂₀ … d̂_k.
    """
    d = normalize(d.detach())
    for _ in range(iterations):
        if trace is not None:
            trace.append(d.detach())
        d = d.detach().requires_grad_(True)
        d = normalize(grad(kl(xi * d), d).detach())
    if trace is not None:
        trace.append(d.detach())
    return d.detach()


class VATConfig(PerturbationConfig):
    name: Literal["vat"] = Field("vat", description="Virtual adversarial training (KL to a power-iteration direction).")
    epsilon: float = Field(1.0, ge=0, description="Size ε of the virtual adversarial perturbation r = ε·d̂.")
    xi: float = Field(
        1e-3,
        gt=0,
        description="Finite-difference radius ξ of the power iteration (same unit as ε). The paper's 1e-6 is below "
        "fp32 resolution here: ∇KL(ξd) ≈ ξ·H·d is computed from softmax differences q − p ≈ ξ, and fp32 "
        "softmax outputs carry ~1e-7 rounding, so ξ = 1e-6 leaves mostly noise; 1e-3 is 10⁴× above it and "
        "still ≪ ε (quadratic regime). The probes run in fp32 under bf16 autocast too (bf16 would round ξ away).",
    )
    iterations: int = Field(1, ge=1, description="Power iterations (the paper: 1 suffices); each costs 1 fwd + 1 bwd.")
    alpha: float = Field(1.0, ge=0, description="Weight α of the VAT term: loss = CE + α·KL(f(x) ‖ f(x + r)).")
    same_dropout_mask: bool = Field(
        True,
        description="One set of dropout masks for the clean pass, the probes and x + r, so the KL measures the "
        "perturbation only; false draws fresh masks per pass (most reference code).",
    )


@register
class VAT(Strategy):
    config_class = VATConfig
    summary = "CE + α·KL(f(x) ‖ f(x + ε·d̂)), d̂ from power iteration on the KL Hessian"
    accumulation = accumulation_note(
        "split-invariant for the same random start (d̂ is normalised per example; CE and KL are means).",
        "NOT split-invariant: d̂ is normalised over the rows the micro-batch uses, not the whole batch's.",
    )
    config: VATConfig

    #: set to True to keep the power-iteration directions d̂₀ … d̂_k (target space) in `iterates`; r = ε·d̂_k
    keep_iterates: bool = False

    def __init__(self, config: VATConfig) -> None:
        super().__init__(config)
        self.iterates: list[torch.Tensor] = []

    def cost(self) -> StepCost:
        n = self.config.iterations
        return StepCost(
            forward=2 + n,
            backward=1 + n,
            note="under bf16 autocast the probes run in fp32, plus 1 fp32 forward (no grad) as their reference",
        )

    def training_step(self, ctx: StepContext) -> StepResult:
        cfg = self.config
        space = PerturbationSpace(ctx, cfg.target)
        unit = cfg.resolve(ctx, 1.0)
        epsilon, xi = cfg.epsilon * unit, cfg.xi * unit

        start = space.gaussian(1.0)  # drawn first: every pass below then starts from the same RNG state
        x = ctx.embed()
        with same_dropout(ctx, cfg.same_dropout_mask):
            logits = ctx.forward(x)
        clean_loss = ctx.loss(logits)
        target = logits.detach()
        x_fixed = x.detach()  # the probes need ∇_d only, not a graph into the embedding weights

        def kl_at(v: torch.Tensor) -> torch.Tensor:
            with same_dropout(ctx, cfg.same_dropout_mask):
                return kl_divergence(probe_target, ctx.forward(x_fixed + space.to_x(v).to(x.dtype)))

        # The probes run in fp32 (module docstring): ξ is far below one bf16 step of the activations. Their
        # reference f(x) must have the same precision, else KL(f(x) ‖ f(x + ξd)) is not 0 at d = 0 and its
        # gradient is the bf16-vs-fp32 difference: under autocast, one more (no-grad) forward.
        half = ctx.half_precision
        self.iterates = []
        with ctx.full_precision():
            probe_target = target
            if half:
                with torch.no_grad(), same_dropout(ctx, cfg.same_dropout_mask):
                    probe_target = ctx.forward(x_fixed)
            d = power_iteration(
                kl_at,
                start,
                xi=xi,
                iterations=cfg.iterations,
                normalize=lambda v: unit_direction(space, v),
                grad=ctx.grad,
                trace=self.iterates if self.keep_iterates else None,
            )
        r = epsilon * d
        vat_kl = kl_divergence(target, ctx.forward(x + space.to_x(r).to(x.dtype)))
        ctx.backward(clean_loss + cfg.alpha * vat_kl)
        return StepResult(
            clean_loss.detach(),
            {
                "kl": vat_kl.detach(),
                "perturbation_norm": space.norms(r).mean(),
                "special_token_share": space.special_token_share(r),
            },
        )
