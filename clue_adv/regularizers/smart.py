"""SMART (Jiang et al., ACL 2020): smoothness-inducing adversarial regularizer + Bregman proximal point.

Loss = CE(x) + α·ℓ_s(f(x + r), f(x)) + μ·ℓ_s(f_θ(x), f_θ̃(x)), ℓ_s(P, Q) = KL(P‖Q) + KL(Q‖P).

* r: r₀ ~ N(0, σ²I) on real tokens, then `iterations` projected ascent steps on ℓ_s(f(x + r), f(x)) with
  f(x) detached: r ← Π_∞,ε(r + η·g/‖g‖_∞) (the paper's Algorithm 1; ‖·‖_∞ per example, or over the used rows
  for the embedding-matrix target). The ascent takes ∇ᵣ by `ctx.grad`, so parameter `.grad` is untouched.
* The training term differentiates ℓ_s through both f(x + r) and f(x), as in the paper's R_s(θ).
* With `same_dropout_mask` (default) the clean, ascent and adversarial passes share one set of dropout masks,
  so ℓ_s measures the perturbation only; mt-dnn draws fresh masks per pass (`same_dropout_mask: false`).
* θ̃ is an EMA ("momentum Bregman proximal point") copy of the model: made in `setup(model)` (deep copy, eval
  mode, no grad) and updated in `after_optimizer_step` as θ̃ ← β·θ̃ + (1 − β)·θ. Its forward (under no_grad,
  eval mode, on the batch's input ids) is counted as a forward, by the pass counter and in `cost()`.

Defaults: the paper's implementation details give ε = 1e-5, σ = 1e-5, η = 1e-3, μ = 1, λ_s ∈ {1, 3, 5},
one ascent step, β = 0.99 (raised to 0.999 after the first 10% of updates there; this version keeps β fixed).
Its reference code (namisan/mt-dnn `SmartPerturbation`: step_size 1e-3, noise_var 1e-5, epsilon 1e-6, weight
`adv_alpha` 1) uses epsilon = 1e-6 only as a guard in g/(‖g‖_∞ + 1e-6) and skips the projection (mt-dnn
issue #224), so here ε is the paper's ball radius 1e-5. These are absolute, for pretrained-BERT embeddings.
Note that mt-dnn's train.py passes its own command-line defaults to that class (in the stored copy read:
adv_step_size 1e-5, adv_noise_var 1e-5, adv_epsilon 1e-6, adv_alpha 1, adv_k 1, adv_p_norm inf), so its runs
step η = 1e-5 unless told otherwise; η is the first value to sweep when SMART does nothing.
Cost with one iteration: 4 forward (clean, x + r₀, x + r, the teacher's), 2 backward (3 forward with μ = 0).

Precision: every pass runs in fp32 whatever the run's precision (`StepContext.full_precision`). ε = σ = 1e-5 are
far below one bf16 step of the activations (relative 2⁻⁸ of a coordinate ≈ 0.05 in pretrained BERT): under bf16
autocast both the ascent and ℓ_s(f(x + r), f(x)) measure rounding (measured at BERT-base width: SMART's share of the
parameter gradient had cosine ≈ 0 with fp32's, and a norm thousands of times fp32's). The clean pass is one side of ℓ_s,
so it is fp32 too, and the teacher, whose lag behind θ is a few optimizer steps, is compared with it. Cost on a GPU
under bf16: the whole step at fp32 speed.

Gradient accumulation: split-invariant with `embedding_output`, NOT with `embedding_matrix`, whose single norm
is taken over the rows each micro-batch uses (`accumulation` below; StepContext has the rule).
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from clue_adv.regularizers import register
from clue_adv.regularizers.base import StepContext, StepCost, StepResult, Strategy
from clue_adv.regularizers.perturb import PerturbationConfig, PerturbationSpace, accumulation_note, same_dropout


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """Batch-mean KL(P‖Q) + KL(Q‖P) = Σ (P − Q)(log P − log Q), in fp32, differentiable in both arguments."""
    log_p = F.log_softmax(p_logits.float(), dim=-1)
    log_q = F.log_softmax(q_logits.float(), dim=-1)
    return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=-1).mean()


class SMARTConfig(PerturbationConfig):
    name: Literal["smart"] = Field("smart", description="SMART: sym-KL adversarial smoothness + EMA Bregman term.")
    epsilon: float = Field(
        1e-5, ge=0, description="L∞ radius ε of the perturbation ball (the paper: 1e-5, absolute, pretrained BERT)."
    )
    step_size: float = Field(
        1e-3, ge=0, description="Ascent step η: r ← Π(r + η·g/‖g‖_∞) (the paper and mt-dnn: 1e-3)."
    )
    noise_std: float = Field(
        1e-5, ge=0, description="Std σ of the Gaussian start r₀ ~ N(0, σ²I) (the paper and mt-dnn: 1e-5)."
    )
    iterations: int = Field(1, ge=1, description="Ascent steps T_x̃ (the paper: 1); each costs 1 forward + 1 backward.")
    alpha: float = Field(
        1.0, ge=0, description="Weight λ_s of the smoothness term (the paper tunes λ_s ∈ {1, 3, 5}; mt-dnn default 1)."
    )
    mu: float = Field(
        1.0, ge=0, description="Weight μ of the Bregman term ℓ_s(f_θ, f_θ̃) (the paper: 1); 0 disables the teacher."
    )
    same_dropout_mask: bool = Field(
        True,
        description="One set of dropout masks for the clean, ascent and adversarial passes (ℓ_s then measures the "
        "perturbation only); false draws fresh masks per pass, as mt-dnn does.",
    )
    momentum: float = Field(
        0.99,
        ge=0,
        lt=1,
        description="EMA momentum β of the teacher θ̃ ← β·θ̃ + (1 − β)·θ after each optimizer step (the paper: 0.99, "
        "0.999 after the first 10% of updates; fixed here).",
    )


@register
class SMART(Strategy):
    config_class = SMARTConfig
    summary = "CE + λ_s·symKL(f(x + r), f(x)), r by L∞-projected ascent, + μ·symKL to an EMA teacher"
    accumulation = accumulation_note(
        "split-invariant for the same random start (the ascent is scaled by each example's ‖g‖_∞; the terms are "
        "means over examples; the EMA teacher is updated per optimizer step).",
        "NOT split-invariant: the ascent is scaled by ‖g‖_∞ over the rows the micro-batch uses.",
    )
    config: SMARTConfig

    #: set to True to keep r₀ … r_T (target space, detached) in `iterates` after a step
    keep_iterates: bool = False

    def __init__(self, config: SMARTConfig) -> None:
        super().__init__(config)
        self.teacher: torch.nn.Module | None = None
        self.iterates: list[torch.Tensor] = []

    def cost(self) -> StepCost:
        n = self.config.iterations
        teacher = 1 if self.config.mu > 0 else 0
        note = "includes 1 forward of the EMA teacher (no grad); " if teacher else ""
        note += "under bf16 autocast every pass runs in fp32"
        return StepCost(forward=2 + n + teacher, backward=1 + n, note=note)

    def setup(self, model: torch.nn.Module) -> None:
        if self.config.mu == 0:
            return
        teacher = copy.deepcopy(model)
        teacher.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
            p.grad = None
        self.teacher = teacher

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.teacher is None else dict(self.teacher.state_dict())

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.teacher is not None:
            self.teacher.load_state_dict(state)

    @torch.no_grad()
    def after_optimizer_step(self, model: torch.nn.Module) -> None:
        if self.teacher is None:
            return
        # One fused call per list instead of a Python loop over ~200 tensors (each a kernel launch on a GPU).
        teacher, student = list(self.teacher.parameters()), [p.detach() for p in model.parameters()]
        buffers, sources = list(self.teacher.buffers()), list(model.buffers())
        if len(teacher) != len(student) or len(buffers) != len(sources):
            raise RuntimeError("the EMA teacher no longer matches the model's parameters and buffers")
        torch._foreach_lerp_(teacher, student, 1.0 - self.config.momentum)
        if buffers:
            torch._foreach_copy_(buffers, sources)

    def _teacher_logits(self, ctx: StepContext) -> torch.Tensor:
        if self.teacher is None:  # the loop calls setup(); a bare StepContext (tests, scripts) may not
            self.setup(ctx.model)
        b = ctx.batch
        # Not through ctx.forward (another module), so counted here to keep the counter in step with cost().
        ctx.counter.forward += 1
        # The run's precision context (StepContext keeps it private; the teacher is not ctx.model).
        with torch.no_grad(), ctx.autocast():
            out = self.teacher(input_ids=b.input_ids, attention_mask=b.attention_mask, token_type_ids=b.token_type_ids)
        return out.logits.float()

    def training_step(self, ctx: StepContext) -> StepResult:
        # Every pass in fp32 (module docstring): the radii and the teacher's lag are below bf16's resolution.
        with ctx.full_precision():
            return self._step(ctx)

    def _step(self, ctx: StepContext) -> StepResult:
        cfg = self.config
        space = PerturbationSpace(ctx, cfg.target)
        unit = cfg.resolve_norm(ctx, 1.0, "linf")  # all three are per-coordinate sizes
        epsilon, step_size, noise_std = cfg.epsilon * unit, cfg.step_size * unit, cfg.noise_std * unit

        r = space.gaussian(noise_std)  # drawn first: every pass below then starts from the same RNG state
        x = ctx.embed()
        with same_dropout(ctx, cfg.same_dropout_mask):
            logits = ctx.forward(x)
        clean_loss = ctx.loss(logits)
        target = logits.detach()
        x_fixed = x.detach()

        self.iterates = [r.detach()] if self.keep_iterates else []
        for _ in range(cfg.iterations):
            r = r.detach().requires_grad_(True)
            with same_dropout(ctx, cfg.same_dropout_mask):
                divergence = symmetric_kl(ctx.forward(x_fixed + space.to_x(r).to(x.dtype)), target)
            g = ctx.grad(divergence, r).float()
            g = g / space.per_unit(space.linf_norms(g).clamp_min(torch.finfo(g.dtype).tiny))
            r = space.project(r.detach() + step_size * g, epsilon, "linf")
            if self.keep_iterates:
                self.iterates.append(r.detach())

        adv_logits = ctx.forward(x + space.to_x(r).to(x.dtype))
        smoothness = symmetric_kl(adv_logits, logits)
        total = clean_loss + cfg.alpha * smoothness
        metrics = {
            "adv_kl": smoothness.detach(),
            "perturbation_norm": space.norms(r).mean(),
            "perturbation_linf": space.linf_norms(r).max(),
            "special_token_share": space.special_token_share(r),
        }
        if cfg.mu > 0:
            proximal = symmetric_kl(logits, self._teacher_logits(ctx))
            total = total + cfg.mu * proximal
            metrics["bregman_kl"] = proximal.detach()
        ctx.backward(total)
        return StepResult(clean_loss.detach(), metrics)
