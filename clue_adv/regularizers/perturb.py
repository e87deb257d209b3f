"""Where a perturbation lives, and the norms, directions and projections on it.

Two targets, both discussed by the study:

* `embedding_output`: r has the shape of x (B×T×H), one norm per example (over its T×H slice),
  padding positions masked out. The usual PyTorch way.
* `embedding_matrix`: r perturbs the rows of the word-embedding matrix E (V×H), with ONE norm over
  the whole gradient ∇_E L, as the study's Keras code does. ∇_E L is zero outside the rows of tokens in
  the batch, so we keep only those rows (unique ids), which is the same vector minus its zeros. Feeding
  E + r to the model equals adding r[id] to x at every position holding that id, so we never write into
  E: the matrix is untouched, bit for bit, and no stale gradient can be left on it. Which rows, and where their
  tokens sit, is worked out on the batch's CPU copy (`Batch.host_tokens`): on a GPU, `unique`, `nonzero` and boolean
  indexing of device tensors each wait for the device (their result's size is data-dependent).

Nothing here reads a device value on the host: sizes come from the CPU copy and metrics stay 0-dim tensors, so a
step runs without synchronising with the GPU.
"""

from __future__ import annotations

import contextlib
from typing import Any, Literal

import torch
from pydantic import Field

from clue_adv.regularizers.base import StepContext, StepResult, StrategyConfig, Target, at_least_fp32

Norm = Literal["l2", "sign", "linf"]
#: a radius or step size: a float as configured, or a 0-dim tensor on the batch's device when measured on the batch
#: (`epsilon_unit: relative`), so that it never has to be read on the host
Size = float | torch.Tensor

# Guards divisions by a norm; the gradient can legitimately be ~0 (a saturated, confident example).
_TINY = 1e-12


class PerturbationSpace:
    """Maps between x-space (B×T×H) and the target space, and does the vector algebra there."""

    def __init__(self, ctx: StepContext, target: Target) -> None:
        self.target = target
        self.mask = ctx.mask  # B×T×1
        ids = ctx.batch.input_ids
        self.shape = (*ids.shape, ctx.embedding.embedding_dim)
        if target == "embedding_matrix":
            host_ids, host_mask = ctx.batch.host_tokens()
            flat = host_ids.reshape(-1)
            real = host_mask.reshape(-1).bool()
            row_ids, inverse = torch.unique(flat[real], return_inverse=True)
            special = torch.isin(row_ids, torch.tensor(ctx.special_token_ids, dtype=row_ids.dtype))
            self.num_rows = len(row_ids)
            self.has_special_rows = bool(special.any())
            # To the device without waiting (the CPU tensors are fresh, so an asynchronous copy is safe).
            device = ids.device
            self.row_ids = row_ids.to(device, non_blocking=True)
            self._positions = real.nonzero(as_tuple=True)[0].to(device, non_blocking=True)  # flat, of real tokens
            self._inverse = inverse.to(device, non_blocking=True)  # row index of each real token
            self.special_rows = special.to(device, non_blocking=True)
        elif target != "embedding_output":
            raise ValueError(f"unknown perturbation target {target!r}")

    # -- moving between x-space and target space ----------------------------------------------------
    def from_x_grad(self, g_x: torch.Tensor) -> torch.Tensor:
        """∇ in target space from ∇ₓ (differentiable, so it also serves the gradient penalties)."""
        g_x = at_least_fp32(g_x) * self.mask  # type promotion keeps float64 as float64
        if self.target == "embedding_output":
            return g_x
        flat = g_x.reshape(-1, self.shape[-1])[self._positions]
        rows = torch.zeros(self.num_rows, self.shape[-1], dtype=flat.dtype, device=flat.device)
        return rows.index_add(0, self._inverse, flat)

    def to_x(self, r: torch.Tensor) -> torch.Tensor:
        """The perturbation of x that `r` (in target space) amounts to; zero on padding."""
        if self.target == "embedding_output":
            return r * self.mask
        out = torch.zeros(self.shape[0] * self.shape[1], self.shape[2], dtype=r.dtype, device=r.device)
        out = out.index_copy(0, self._positions, r[self._inverse])
        return out.reshape(self.shape)

    # -- algebra in target space --------------------------------------------------------------------
    def norms(self, v: torch.Tensor) -> torch.Tensor:
        """L2 norms: one per example (B,) for embedding_output, one scalar for embedding_matrix. In fp32 at least:
        an fp16 norm overflows to inf above 65504 and, if squared in fp16, underflows to 0 for entries ~1e-5."""
        v = at_least_fp32(v)
        if self.target == "embedding_output":
            return v.flatten(1).norm(dim=1)
        return v.norm()

    def _broadcast(self, per_unit: torch.Tensor) -> torch.Tensor:
        if self.target == "embedding_output":
            return per_unit.view(-1, 1, 1)
        return per_unit

    def squared_norm_sum(self, v: torch.Tensor) -> torch.Tensor:
        """Σ‖v‖² over the whole batch (= ‖v‖² for the matrix); used by the gradient penalties."""
        return v.pow(2).sum()

    def direction(self, g: torch.Tensor, norm: Norm) -> torch.Tensor:
        """Unit-size steepest-ascent direction: ĝ (L2) or sign(g) (sign/L∞), zero on padding, in fp32 at least
        (in fp16 the clamp's 1e-12 rounds to 0, so a zero gradient would give 0/0 = NaN)."""
        g = at_least_fp32(g)
        if norm == "l2":
            return g / self._broadcast(self.norms(g).clamp_min(_TINY))
        return torch.sign(g)

    def project(self, r: torch.Tensor, epsilon: Size, norm: Norm) -> torch.Tensor:
        """Π onto the ε-ball: rescale if ‖r‖₂ > ε (L2), clamp elementwise (sign/L∞)."""
        if norm == "l2":
            n = self._broadcast(self.norms(r))
            return r * torch.clamp(epsilon / n.clamp_min(_TINY), max=1.0)
        return r.clamp(-epsilon, epsilon)

    def random(self, epsilon: Size, norm: Norm, generator: torch.Generator | None = None) -> torch.Tensor:
        """A random start uniform in the ε-ball, zero on padding. L∞: every coordinate uniform in [-ε, ε]. L2: a
        Gaussian direction at radius ε·u^(1/n), u uniform and n the ball's dimension (the coordinates it spans):
        uniform in volume. In these dimensions (n ≈ T·H) that radius is within a hair of ε, as it should be."""
        device = self.mask.device
        if norm != "l2":
            r = (torch.rand(self.target_shape, generator=generator, device=device) * 2 - 1) * epsilon
            return r * self.mask if self.target == "embedding_output" else r
        r = torch.randn(self.target_shape, generator=generator, device=device)
        if self.target == "embedding_output":
            r = r * self.mask
            dims = (self.mask.flatten(1).sum(1) * self.shape[-1]).float().clamp_min(1)  # tokens × H, per example
        else:
            dims = torch.full((), float(r.numel()), device=device)
        radius = epsilon * torch.rand(dims.shape, generator=generator, device=device).pow(1.0 / dims)
        return r * self._broadcast(radius / self.norms(r).clamp_min(_TINY))

    def special_token_share(self, r: torch.Tensor) -> torch.Tensor | float:
        """Share of ‖r‖² on special-token rows ([CLS], [SEP], ...): large values flag a degenerate ε. A 0-dim tensor
        (no host sync); nan when not applicable (embedding_output, or no special token in the batch)."""
        if self.target != "embedding_matrix" or not self.has_special_rows:
            return float("nan")
        per_row = r.detach().pow(2).sum(dim=-1)
        return (per_row * self.special_rows.to(per_row.dtype)).sum() / per_row.sum().clamp_min(_TINY)

    # -- helpers used by the multi-step methods (PGD, FreeLB, VAT, SMART) ------------------------------
    @property
    def target_shape(self) -> tuple[int, ...]:
        """Shape of r: B×T×H for embedding_output, (used rows)×H for embedding_matrix."""
        if self.target == "embedding_output":
            return self.shape
        return (self.num_rows, self.shape[-1])

    def zeros(self) -> torch.Tensor:
        """r = 0 in target space (fp32)."""
        return torch.zeros(self.target_shape, device=self.mask.device)

    def gaussian(self, std: Size, generator: torch.Generator | None = None) -> torch.Tensor:
        """std·N(0, I) in target space (fp32), zero on padding."""
        r = torch.randn(self.target_shape, generator=generator, device=self.mask.device) * std
        return r * self.mask if self.target == "embedding_output" else r

    def per_unit(self, values: torch.Tensor) -> torch.Tensor:
        """Broadcast one value per unit ((B,) per example, or a scalar for the matrix) against r."""
        return self._broadcast(values)

    def linf_norms(self, v: torch.Tensor) -> torch.Tensor:
        """Max-abs norms: one per example (B,) for embedding_output, one scalar for embedding_matrix."""
        if self.target == "embedding_output":
            return v.flatten(1).abs().amax(dim=1)
        return v.abs().amax()

    def real_sizes(self) -> torch.Tensor:
        """Number of coordinates a perturbation may touch: per example (real tokens × H), or used rows × H."""
        if self.target == "embedding_output":
            return self.mask.flatten(1).sum(dim=1) * self.shape[-1]
        return torch.full((), float(self.num_rows * self.shape[-1]), device=self.mask.device)


def embedding_scale(ctx: StepContext, target: Target) -> torch.Tensor:
    """Typical size of what the target perturbs: mean L2 norm of a real example's x (T×H slice) or of
    the whole set of used embedding rows (0-dim, on the batch's device). Lets ε be stated relative to the
    embeddings: a random-init tiny BERT has embeddings several times smaller than pretrained bert-base-chinese
    (see docs/REGULARIZERS.md)."""
    with torch.no_grad():
        space = PerturbationSpace(ctx, target)
        if target == "embedding_output":
            return space.norms(ctx.embed().float() * ctx.mask).mean()
        return ctx.embedding.weight[space.row_ids].float().norm()


def same_dropout(ctx: StepContext, enabled: bool = True) -> contextlib.AbstractContextManager[Any]:
    """Context for a pass after which the RNG (CPU, and the batch's CUDA device) is restored, so the next pass
    draws the same dropout masks. Multi-pass methods run every pass but the last inside it: all passes share
    one set of masks and the RNG ends where one ordinary forward would leave it."""
    if not enabled:
        return contextlib.nullcontext()
    device = ctx.batch.input_ids.device
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    return torch.random.fork_rng(devices=devices)


def coordinate_scale(ctx: StepContext, target: Target) -> torch.Tensor:
    """Typical size of ONE coordinate of what the target perturbs: the mean over examples of ‖x_i‖/√n_i
    (n_i = real tokens × H), or ‖E_used‖/√(rows × H). The unit of a relative sign/L∞ radius: ε·sign(g) with
    ε = ε_rel·coordinate_scale has L2 size ε_rel·‖x‖, like an L2 perturbation with the same ε_rel (0-dim, on the
    batch's device)."""
    with torch.no_grad():
        space = PerturbationSpace(ctx, target)
        if target == "embedding_output":
            x = ctx.embed().float() * ctx.mask
            return (space.norms(x) / space.real_sizes().sqrt()).mean()
        rows = ctx.embedding.weight[space.row_ids].float()
        return rows.norm() / space.real_sizes().sqrt()


class PerturbationConfig(StrategyConfig):
    """Fields shared by every method that perturbs the embeddings."""

    target: Target = Field(
        "embedding_output",
        description="What is perturbed: each example's word-embedding output (per-example norm, the usual "
        "PyTorch way) or the word-embedding matrix (one global norm, the study's Keras code).",
    )
    epsilon_unit: Literal["absolute", "relative"] = Field(
        "absolute",
        description="`absolute`: ε in embedding units, as papers state it for pretrained BERT. `relative`: ε is a "
        "fraction of the embeddings' own size in this batch (embedding_output: the batch's mean of each example's "
        "‖x‖, one scale for every example; embedding_matrix: the norm of the used rows), so one value "
        "transfers between pretrained and random-init/tiny models, whose embeddings are much smaller. A sign/L∞ "
        "radius is then a fraction of the typical coordinate (‖x‖/√n), so ε·sign(g) has L2 size ε·‖x‖ too.",
    )

    def resolve(self, ctx: StepContext, value: float) -> Size:
        """A radius or step size in embedding units for this batch (a tensor when relative: see `Size`)."""
        if self.epsilon_unit == "absolute":
            return value
        return value * embedding_scale(ctx, self.target)

    def resolve_norm(self, ctx: StepContext, value: float, norm: Norm) -> Size:
        """Like `resolve`, for a radius measured in `norm`: a relative sign/L∞ radius is a fraction of the
        typical coordinate (`coordinate_scale`), not of the whole L2 norm, which would make ε·sign(g) √n times
        larger than the L2 perturbation with the same ε."""
        if norm == "l2" or self.epsilon_unit == "absolute":
            return self.resolve(ctx, value)
        return value * coordinate_scale(ctx, self.target)


def accumulation_note(output: str, matrix: str) -> str:
    """A perturbing strategy's `accumulation` text (see StepContext): what a split of the batch into micro-batches
    changes for each target, and the caveat every strategy with `epsilon_unit` shares."""
    return (
        f"embedding_output: {output} embedding_matrix: {matrix} With `epsilon_unit: relative` the unit is measured "
        "on each micro-batch (a mean over its examples' embeddings, or the rows it uses), so sizes depend slightly "
        "on the split."
    )


def train_on_perturbed(
    ctx: StepContext, space: PerturbationSpace, r: torch.Tensor, clean_loss: torch.Tensor
) -> StepResult:
    """The last pass of FGM/PGD: backpropagate L(x + r) into the parameters (through a fresh embedding lookup,
    so the word-embedding weights get their gradient at the perturbed point) and report what a user needs to
    judge ε: the adversarial loss, the perturbation's norm and its share on special tokens."""
    x = ctx.embed()
    adv_loss = ctx.loss(ctx.forward(x + space.to_x(r).to(x.dtype)))
    ctx.backward(adv_loss)
    return StepResult(
        clean_loss.detach(),
        {
            "adv_loss": adv_loss.detach(),
            "perturbation_norm": space.norms(r.detach()).mean(),
            "special_token_share": space.special_token_share(r),
        },
    )
