"""Every strategy under bf16 autocast (the GPU default, exercised here on the CPU): finite loss and gradients,
fp32 logits for the losses, and the (perturbed) embeddings fed to the model kept in fp32."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_ctx, tiny_bert

from clue_adv.regularizers import build_strategy, registry


def _config(name: str):
    cls = registry()[name].config_class
    fields = cls.model_fields
    # Random-init embeddings are small: state ε relative to them where the strategy allows it.
    extra = {"epsilon_unit": "relative"} if "epsilon_unit" in fields else {}
    extra |= {k: 0.05 for k in ("epsilon", "adv_lr", "init_magnitude") if k in fields}
    return cls(**extra)


def _record_model_inputs(model: torch.nn.Module) -> list[torch.dtype]:
    """The dtype of every inputs_embeds the model itself receives (a hook on the model, so a call that passes no
    x, or a cast anywhere between the strategy and the model, is seen too)."""
    seen: list[torch.dtype] = []

    def hook(_module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        seen.append(x.dtype if x is not None else None)

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def _bf16_ctx(model, batch):
    return make_ctx(model, batch, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))


@pytest.mark.parametrize("name", list(registry()))
def test_a_bf16_autocast_step_is_finite(name, batch):
    model = tiny_bert(dropout=0.1, attn="eager")
    strategy = build_strategy(_config(name))
    strategy.setup(model)
    model.zero_grad(set_to_none=True)
    ctx = _bf16_ctx(model, batch)
    seen_dtypes = _record_model_inputs(model)
    original = ctx.forward

    def forward(x=None):
        logits = original(x)
        assert logits.dtype == torch.float32  # losses and divergences in fp32 at least
        return logits

    ctx.forward = forward
    result = strategy.training_step(ctx)
    assert math.isfinite(float(result.loss))
    assert all(math.isfinite(v) or math.isnan(v) for v in result.metrics.values())  # nan = "not applicable"
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert seen_dtypes, "the model was never called"
    # what goes into the model: x (+ r), built in fp32 (autocast casts inside the layers, not the input)
    assert all(d == torch.float32 for d in seen_dtypes), seen_dtypes


def test_the_input_dtype_check_sees_a_half_input(batch):
    """The hook above is not vacuous: an x cast to half before the model is recorded as half."""
    model = tiny_bert(dropout=0.0, attn="eager")
    ctx = _bf16_ctx(model, batch)
    seen_dtypes = _record_model_inputs(model)
    ctx.forward(ctx.embed().to(torch.bfloat16))
    ctx.forward()
    assert seen_dtypes == [torch.bfloat16, torch.float32]


# Entries of 1e-5: their fp16 squares (1e-10) are below fp16's smallest subnormal (6e-8), so a naive fp16
# (g*g).sum().sqrt() is 0 and g/‖g‖ NaN; 1e3 over a few hundred entries overflows an fp16 norm (> 65504) to inf,
# and g/inf is 0, not a unit vector; and a zero fp16 gradient meets the clamp's 1e-12, which rounds to 0 in fp16.
HALF_SCALES = [1e-5, 1e3, 0.0]


def _half_grad(space, scale: float) -> torch.Tensor:
    g = torch.full(space.target_shape, scale)
    g[..., ::2] *= -1  # mixed signs, so sign(g) is not trivially constant
    if space.target == "embedding_output":
        g = g * space.mask
    return g.half()


def _assert_unit(space, d: torch.Tensor, scale: float) -> None:
    assert d.dtype == torch.float32  # the perturbation algebra runs in fp32 at least
    assert bool(torch.isfinite(d).all())
    expected = torch.ones_like(space.norms(d)) if scale else torch.zeros_like(space.norms(d))
    torch.testing.assert_close(space.norms(d), expected, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("target", ["embedding_output", "embedding_matrix"])
@pytest.mark.parametrize("scale", HALF_SCALES)
def test_an_fp16_gradient_gives_a_finite_unit_direction(target, scale, batch):
    """PerturbationSpace.direction is FGM/PGD/SMART's step and FreeLB's ascent step δ += adv_lr·g/‖g‖₂."""
    from clue_adv.regularizers.perturb import PerturbationSpace

    space = PerturbationSpace(make_ctx(tiny_bert(), batch), target)
    g = _half_grad(space, scale)
    _assert_unit(space, space.direction(g, "l2"), scale)
    sign = space.direction(g, "sign")
    assert sign.dtype == torch.float32
    torch.testing.assert_close(sign, torch.sign(g.float()))  # ±1 on every non-zero entry, exact
    assert space.norms(space.project(g, 1.0, "l2")).isfinite().all()


@pytest.mark.parametrize("target", ["embedding_output", "embedding_matrix"])
@pytest.mark.parametrize("scale", HALF_SCALES)
def test_vat_normalises_an_fp16_gradient_to_a_finite_unit_vector(target, scale, batch):
    from clue_adv.regularizers.perturb import PerturbationSpace
    from clue_adv.regularizers.vat import unit_direction, unit_l2

    space = PerturbationSpace(make_ctx(tiny_bert(), batch), target)
    g = _half_grad(space, scale)
    _assert_unit(space, unit_direction(space, g), scale)  # the power iteration's per-unit normalisation
    whole = unit_l2(g)  # the standalone helper: one norm over the whole tensor
    assert whole.dtype == torch.float32 and bool(torch.isfinite(whole).all())
    torch.testing.assert_close(whole.norm(), torch.tensor(1.0 if scale else 0.0), atol=1e-3, rtol=1e-3)
