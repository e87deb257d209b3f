"""Per-example measurements on one batch, with respect to the word-embedding output x (real tokens only): the loss
and its input gradient ‖∇ₓℓ‖, the input curvature tr ∇ₓ²ℓ by Hutchinson's estimator (Rademacher probes v,
E vᵀHv = tr H, one Hessian-vector product each), and accuracy under FGM and PGD attacks on x at radii stated
relative to each example's own ‖x‖. clue_adv/diagnostics.py runs them over seeded subsets (docs/DIAGNOSTICS.md).

Everything goes through `torch.autograd.grad` with respect to x only: parameters and their `.grad` are untouched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from clue_adv.regularizers.base import Batch, at_least_fp32

# Guards divisions by a norm: a confident example's gradient can be ~0.
_TINY = 1e-12
# PGD step size as a multiple of ε/K (Madry et al. 2018's rule of thumb): K steps of 2.5ε/K can reach the
# sphere and still move along it after a projection.
PGD_STEP_RATIO = 2.5


def _as_batch(raw: Batch | Mapping[str, torch.Tensor], device: torch.device) -> Batch:
    if isinstance(raw, Batch):
        return Batch(
            raw.input_ids.to(device),
            raw.attention_mask.to(device),
            raw.labels.to(device),
            None if raw.token_type_ids is None else raw.token_type_ids.to(device),
        )
    return Batch.from_mapping(dict(raw), device)


def _logits(model: torch.nn.Module, batch: Batch, x: torch.Tensor) -> torch.Tensor:
    out = model(inputs_embeds=x, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids)
    return at_least_fp32(out.logits)


def _embed(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """x (detached, B×T×H) and its B×T×1 mask of real tokens in x's dtype."""
    x = model.get_input_embeddings()(batch.input_ids).detach()
    return x, batch.attention_mask.unsqueeze(-1).to(x.dtype)


def _per_example_norm(v: torch.Tensor) -> torch.Tensor:
    return at_least_fp32(v).flatten(1).norm(dim=1)


def rademacher_probes(count: int, shape: Sequence[int], mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`count` probes of `shape` with independent ±1 entries on real tokens and 0 on padding (count×B×T×H). Drawn
    on the CPU from `generator`, so a CPU and a GPU run get the same probes."""
    signs = torch.randint(0, 2, (count, *shape), generator=generator).mul_(2).sub_(1)
    return signs.to(device=mask.device, dtype=mask.dtype) * mask


@dataclass
class ExampleMeasures:
    """Per-example values for one batch (each of shape (B,), attack values (E, B) for E radii)."""

    loss: torch.Tensor
    correct: torch.Tensor
    input_grad_norm: torch.Tensor
    embedding_norm: torch.Tensor
    curvature: torch.Tensor | None = None
    curvature_se: torch.Tensor | None = None
    fgm_correct: torch.Tensor | None = None
    fgm_loss: torch.Tensor | None = None
    pgd_correct: torch.Tensor | None = None
    pgd_loss: torch.Tensor | None = None


def measure_batch(
    model: torch.nn.Module,
    batch: Batch | Mapping[str, torch.Tensor],
    *,
    probes: int | torch.Tensor = 0,
    generator: torch.Generator | None = None,
    epsilons: Sequence[float] = (),
    pgd_steps: int = 3,
) -> ExampleMeasures:
    """Clean loss and correctness, ‖∇ₓℓ‖, and optionally the Hutchinson curvature and the attacks, per example.

    ℓ is each example's cross-entropy (no label smoothing), x its word-embedding output. `probes` is a number of
    Rademacher probes drawn from `generator`, or explicit probes (P×B×T×H, e.g. every sign vector in a test).
    The model is used as it is (call it in eval mode); parameters' `.grad` are not touched."""
    device = next(model.parameters()).device
    batch = _as_batch(batch, device)
    x0, mask = _embed(model, batch)
    count = probes if isinstance(probes, int) else int(probes.shape[0])
    with torch.enable_grad():
        x = x0.clone().requires_grad_(True)
        logits = _logits(model, batch, x)
        losses = F.cross_entropy(logits, batch.labels, reduction="none")
        # The sum: its gradient in example i's slice is ∇ₓℓᵢ (examples do not interact in eval mode), and its
        # Hessian is block-diagonal, so vᵀHv restricted to slice i is example i's own quadratic form.
        (grad,) = torch.autograd.grad(losses.sum(), x, create_graph=count > 0)
        out = ExampleMeasures(
            loss=losses.detach(),
            correct=logits.detach().argmax(-1) == batch.labels,
            input_grad_norm=_per_example_norm(grad.detach() * mask),
            embedding_norm=_per_example_norm(x0 * mask),
        )
        if count > 0:
            if isinstance(probes, int):
                if generator is None:
                    raise ValueError("random probes need a generator (seeded: runs are compared in pairs)")
                probes = rademacher_probes(count, x0.shape, mask, generator)
            quadratic = []
            for k in range(count):
                v = probes[k].to(device=device, dtype=x0.dtype) * mask
                (hv,) = torch.autograd.grad(grad, x, grad_outputs=v, retain_graph=k < count - 1)
                quadratic.append(at_least_fp32(v * hv).flatten(1).sum(1).detach())
            values = torch.stack(quadratic)  # P×B
            out.curvature = values.mean(0)
            out.curvature_se = values.std(0) / math.sqrt(count) if count > 1 else torch.full_like(values[0], math.nan)
        clean_grad = grad.detach() * mask
        del grad, logits, losses, x  # the double-backward graph is not needed by the attacks
        if epsilons:
            _attacks(model, batch, x0, mask, clean_grad, out, list(epsilons), pgd_steps)
    return out


def _attacks(
    model: torch.nn.Module,
    batch: Batch,
    x0: torch.Tensor,
    mask: torch.Tensor,
    gradient: torch.Tensor,
    out: ExampleMeasures,
    epsilons: list[float],
    steps: int,
) -> None:
    """FGM and PGD (L2, per example, r₀ = 0) at each relative radius, in increasing order.

    FGM: the point x + ε‖x‖·ĝ. PGD: K steps r ← Π(r + α·ĝ(x + r)), α = 2.5ε/K. Every point tried lies in the
    ball, so the PGD figures are those of the strongest attack run: an example counts as correct at ε only if
    the clean input, the FGM point and every PGD iterate at every radius ≤ ε are classified correctly, and its
    loss is the highest found there. Hence PGD accuracy never rises with ε and is at most the FGM and the clean
    accuracy (FGM alone is a linear guess and need not be monotone)."""
    scale = out.embedding_norm.to(x0.dtype).view(-1, 1, 1)
    broken = ~out.correct
    worst = out.loss.clone()
    fgm_correct, fgm_loss, pgd_correct, pgd_loss = [], [], [], []
    for epsilon in sorted(epsilons):
        radius = epsilon * scale  # B×1×1, per example
        with torch.no_grad():
            logits = _logits(model, batch, x0 + radius * _direction(gradient))
        loss = F.cross_entropy(logits, batch.labels, reduction="none")
        correct = logits.argmax(-1) == batch.labels
        fgm_correct.append(correct)
        fgm_loss.append(loss)
        broken, worst = broken | ~correct, torch.maximum(worst, loss)
        r, g = torch.zeros_like(x0), gradient
        alpha = PGD_STEP_RATIO * radius / steps
        for k in range(steps):
            r = _project(r + alpha * _direction(g), radius)
            g, loss, correct = _input_grad(model, batch, x0, mask, r, need_grad=k < steps - 1)
            broken, worst = broken | ~correct, torch.maximum(worst, loss)
        pgd_correct.append(~broken)
        pgd_loss.append(worst.clone())
    out.fgm_correct, out.fgm_loss = torch.stack(fgm_correct), torch.stack(fgm_loss)
    out.pgd_correct, out.pgd_loss = torch.stack(pgd_correct), torch.stack(pgd_loss)


def _direction(g: torch.Tensor) -> torch.Tensor:
    """ĝ per example (zero on padding, where g is masked to zero)."""
    return g / _per_example_norm(g).clamp_min(_TINY).to(g.dtype).view(-1, 1, 1)


def _project(r: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Onto the per-example L2 ball of `radius` (B×1×1)."""
    norms = _per_example_norm(r).to(r.dtype).view(-1, 1, 1)
    return r * torch.clamp(radius / norms.clamp_min(_TINY), max=1.0)


def _input_grad(
    model: torch.nn.Module, batch: Batch, x0: torch.Tensor, mask: torch.Tensor, r: torch.Tensor, need_grad: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∇ᵣΣℓ masked to real tokens, per-example loss, correct) at x0 + r. Without `need_grad` (the last PGD
    iterate only needs its prediction) no graph is built and the gradient is zeros."""
    r = (r * mask).detach().requires_grad_(need_grad)
    with torch.set_grad_enabled(need_grad):
        logits = _logits(model, batch, x0 + r)
        losses = F.cross_entropy(logits, batch.labels, reduction="none")
        grad = torch.autograd.grad(losses.sum(), r)[0] * mask if need_grad else torch.zeros_like(r)
    return grad.detach(), losses.detach(), logits.detach().argmax(-1) == batch.labels
