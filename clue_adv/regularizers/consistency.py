"""Consistency training: L(f(x), y) + λ·d(f(x + ε), f(x)), the study's eq. 7, and R-Drop.

ε is whatever differs between two passes over the same batch: a second dropout mask (always, in training
mode) plus, with `sigma` > 0, Gaussian noise σ·N(0, I) on the second pass's word-embedding output
(zero on padding). Both passes run as ONE forward of the batch stacked on itself (2B examples): every
example draws its own dropout mask, so the halves get independent masks, and one big forward is faster
than two small ones. The counter counts it as one forward (of twice the batch), as `cost()` says; its
`batch_factor` 2 makes it worth two passes at batch B, which is what the benchmark measures.
With `same_dropout_mask` the passes run separately on one dropout mask (noise-only consistency), and with
`target: embedding_matrix` the noise is one draw per used embedding row, as in `gaussian_noise`.

Divergences, per example and averaged over the batch, with q = f(x) (first pass) and p = f(x + ε):
* `mse`: ‖p − q‖² summed over classes. For small Gaussian ε, E d ≈ σ²·Σᵢ‖∇ₓfᵢ‖² (the study's eq. 8), the
  quantity `jacobian_penalty` estimates.
* `kl`: KL(q ‖ p), the clean pass as the reference (the study's eq. 7 with a KL loss, as in VAT/UDA).
* `sym_kl`: ½(KL(p ‖ q) + KL(q ‖ p)).

R-Drop (Liang et al. 2021) is `sigma: 0, divergence: sym_kl, ce_on_both: true, stop_gradient_clean: false`.
What this computes, CE and the divergence each averaged over the batch:
    ½(CE₁ + CE₂) + weight·½(KL(p₁‖p₂) + KL(p₂‖p₁)),
which is half of the paper's per-example loss CE₁ + CE₂ + α·½(KL(p₁‖p₂) + KL(p₂‖p₁)) with α = 2·weight.
So `weight` = α/2, α being the paper's per-example coefficient; the overall factor ½ changes only the
gradient's size (which AdamW largely ignores, though gradient clipping does not).
The official code reduces differently, so its constants do not carry over as they are: its README snippet
averages the CEs but SUMS the KL over the batch, ½(CE₁ + CE₂) + α·Σ_batch ½(KL + KL), i.e. weight = B·α;
its BERT/GLUE `bert_kl` (huggingface_transformer_src, read in a stored copy) computes
CE₁ + CE₂ + 0.5·Σ_batch ½(KL + KL), i.e. α = 0.5·B per example (weight = B/4: 8 at B = 32).
The values α ∈ {0.1, 0.5, 1.0} tuned per GLUE task are quoted from memory of the paper, and it is not clear
which of these reductions they refer to: treat the weight as a hyper-parameter to search, not a settled value.

Precision: with `sigma` > 0 both passes run in fp32 whatever the run's precision (`StepContext.full_precision`).
The divergence a noise of σ causes is second order in σ, and under bf16 autocast the passes' rounding swamps it:
measured at BERT-base width without dropout, σ = 0.01 (a fifth of a pretrained coordinate) gave a bf16 gradient of
the term with cosine ≈ 0.5 to fp32's. With σ = 0 (R-Drop) the passes differ by their dropout masks, by far more than
rounding, and keep the run's precision. Cost on a GPU under bf16 with σ > 0: the step at fp32 speed.

Gradient accumulation: split-invariant with `embedding_output` (for the same draws); with `embedding_matrix`
noise only in expectation (`accumulation` below; StepContext has the rule).
"""

from __future__ import annotations

import contextlib
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from clue_adv.regularizers import register
from clue_adv.regularizers.base import Batch, StepContext, StepCost, StepResult, Strategy
from clue_adv.regularizers.gaussian_noise import noise_x
from clue_adv.regularizers.perturb import PerturbationConfig, accumulation_note, same_dropout

Divergence = Literal["mse", "kl", "sym_kl"]


class ConsistencyConfig(PerturbationConfig):
    name: Literal["consistency"] = Field(
        "consistency", description="Consistency between two passes (dropout and/or Gaussian noise); R-Drop."
    )
    weight: float = Field(
        1.0,
        ge=0,
        description="λ: weight of the batch-mean divergence. For R-Drop (sym_kl + ce_on_both) weight = α/2, α being "
        "the paper's per-example coefficient in CE₁ + CE₂ + α·½(KL(p₁‖p₂) + KL(p₂‖p₁)).",
    )
    sigma: float = Field(
        0.0,
        ge=0,
        description="Std of Gaussian noise on the second pass's `target` (units as in `gaussian_noise`); 0 = the two "
        "passes differ by their dropout masks only.",
    )
    same_dropout_mask: bool = Field(
        False,
        description="Both passes use one dropout mask, so they differ by the noise alone (noise-only consistency: "
        "with sigma 0 the divergence is exactly 0). Runs two forwards of the batch instead of one of it stacked twice.",
    )
    divergence: Divergence = Field(
        "sym_kl",
        description="`mse`: ‖p − q‖² over classes; `kl`: KL(q‖p) with the first pass q as reference; "
        "`sym_kl`: ½(KL(p‖q) + KL(q‖p)) (R-Drop). Per example, averaged over the batch.",
    )
    stop_gradient_clean: bool = Field(
        False,
        description="Treat the first pass's probabilities as a constant target in the divergence (VAT/UDA style); "
        "false lets both passes move towards each other (R-Drop).",
    )
    ce_on_both: bool = Field(
        False,
        description="Task loss ½(CE₁ + CE₂) over both passes (R-Drop) instead of the first pass's CE alone.",
    )


def divergence(kind: Divergence, noisy_logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """d(p, q) per example (shape B), p = softmax(noisy_logits), q = softmax(clean_logits)."""
    log_p = F.log_softmax(noisy_logits, dim=-1)
    log_q = F.log_softmax(clean_logits, dim=-1)
    if kind == "mse":
        return (log_p.exp() - log_q.exp()).pow(2).sum(-1)
    kl_q_p = (log_q.exp() * (log_q - log_p)).sum(-1)
    if kind == "kl":
        return kl_q_p
    kl_p_q = (log_p.exp() * (log_p - log_q)).sum(-1)
    return 0.5 * (kl_p_q + kl_q_p)


def doubled_context(ctx: StepContext) -> StepContext:
    """A context over the batch stacked on itself (2B examples), sharing the model, precision, loss settings
    and the pass counter; its forward of 2B examples counts as one forward."""
    b = ctx.batch

    def twice(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.cat([t, t])

    batch = Batch(
        input_ids=twice(b.input_ids),
        attention_mask=twice(b.attention_mask),
        labels=twice(b.labels),
        token_type_ids=twice(b.token_type_ids),
        host_input_ids=twice(b.host_input_ids),
        host_attention_mask=twice(b.host_attention_mask),
    )
    return StepContext(
        ctx.model,
        batch,
        label_smoothing=ctx.label_smoothing,
        loss_scale=ctx.loss_scale,
        autocast=ctx.autocast,  # the bound method is a factory of the step's precision context
        counter=ctx.counter,
        special_token_ids=ctx.special_token_ids,
    )


@register
class Consistency(Strategy):
    config_class = ConsistencyConfig
    summary = "L + λ·d(f(x + ε), f(x)), ε = dropout and/or σ·N(0, I); R-Drop with sym_kl + ce_on_both"
    accumulation = accumulation_note(
        "split-invariant for the same noise and dropout draws (losses and divergences are means over examples).",
        "noise as in `gaussian_noise`: the same in expectation, not per draw.",
    )
    config: ConsistencyConfig

    def cost(self) -> StepCost:
        fp32 = "; with sigma > 0, in fp32 under bf16 autocast" if self.config.sigma > 0 else ""
        if self.config.same_dropout_mask:
            return StepCost(forward=2, backward=1, note="two forwards of the batch sharing one dropout mask" + fp32)
        return StepCost(
            forward=1, backward=1, batch_factor=2, note="one forward of the batch stacked twice (2B examples)" + fp32
        )

    def _logits(self, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean, noisy) logits; the noise is on the second pass only, padding positions stay exact."""
        cfg = self.config
        if cfg.same_dropout_mask:
            # Stacking cannot share a mask (each of the 2B rows draws its own), so two passes with the RNG
            # rewound in between: the second redraws the first's masks.
            # The noise is drawn first: a draw between the passes would shift the second pass's masks.
            x = ctx.embed()
            noisy_x = x + noise_x(ctx, cfg, cfg.sigma).to(x.dtype) if cfg.sigma > 0 else x
            with same_dropout(ctx):
                clean_logits = ctx.forward(x)
            return clean_logits, ctx.forward(noisy_x)
        pair = doubled_context(ctx)
        size = ctx.batch.size
        x = pair.embed()
        if cfg.sigma > 0:
            x = torch.cat([x[:size], x[size:] + noise_x(ctx, cfg, cfg.sigma).to(x.dtype)])
        logits = pair.forward(x)
        return logits[:size], logits[size:]

    def training_step(self, ctx: StepContext) -> StepResult:
        # With noise, the passes run in fp32 (module docstring): their divergence is second order in σ and drowns in
        # bf16 rounding. Two dropout masks (σ = 0) differ by far more than rounding: the run's precision is exact.
        with ctx.full_precision() if self.config.sigma > 0 else contextlib.nullcontext():
            return self._step(ctx)

    def _step(self, ctx: StepContext) -> StepResult:
        clean_logits, noisy_logits = self._logits(ctx)
        clean_loss = ctx.loss(clean_logits)
        noisy_loss = ctx.loss(noisy_logits)
        task_loss = 0.5 * (clean_loss + noisy_loss) if self.config.ce_on_both else clean_loss
        reference = clean_logits.detach() if self.config.stop_gradient_clean else clean_logits
        d = divergence(self.config.divergence, noisy_logits, reference).mean()
        ctx.backward(task_loss + self.config.weight * d)
        return StepResult(clean_loss.detach(), {"divergence": d.detach(), "noisy_loss": noisy_loss.detach()})
