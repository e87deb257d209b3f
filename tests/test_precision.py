"""Every strategy under bf16 autocast (the GPU default, exercised here on the CPU): finite loss and gradients,
fp32 logits for the losses, and the (perturbed) embeddings fed to the model kept in fp32."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import TOKENIZER_DIR, make_ctx, tiny_bert

from clue_adv.regularizers import build_strategy, registry
from clue_adv.regularizers.base import Batch


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


# -- the direction a strategy computes under bf16 is the fp32 one ------------------------------------------------
# Each strategy's regularizer switched off: its weight or size at 0, so the step is the strategy's own task-loss step
# (in the precision the strategy runs it) and "step minus step off" is the regularizer's share of the gradient.
REGULARIZER_OFF = {
    "consistency": {"weight": 0.0},
    "fgm": {"epsilon": 0.0},
    "freelb": {"adv_lr": 0.0, "init_magnitude": 0.0},
    "gaussian_noise": {"sigma": 0.0},
    "gradient_penalty": {"epsilon": 0.0},
    "jacobian_penalty": {"weight": 0.0},
    "pgd": {"epsilon": 0.0},
    "smart": {"alpha": 0.0, "mu": 0.0},
    "vat": {"alpha": 0.0},
}
# The defaults, except: consistency's σ = 0 has no regularizer without dropout (gaussian_noise's σ instead); the
# Jacobian penalty's weight 0.01 makes it ~1% of this model's gradient, and the bf16 rounding of the task-loss
# gradient, which the steps with and without it do not share, is then a fifth of its share (cosine 0.93; 0.999 at
# 0.1, a penalty computed as exactly as at 0.01); and finite-difference gradient penalties whose step bf16 cannot
# resolve (ε or h small; the old bf16 passes: cosine 0.33 and 0.78).
DIRECTION_CASES = [
    pytest.param(name, {"consistency": {"sigma": 0.01}, "jacobian_penalty": {"weight": 0.1}}.get(name, {}), id=name)
    for name in registry()
    if name != "none"  # nothing to regularize
] + [
    pytest.param("gradient_penalty", {"mode": "finite_difference", "epsilon": 0.01}, id="gp-fd-scaled-eps0.01"),
    pytest.param("gradient_penalty", {"mode": "finite_difference", "fd_step": "unit", "h": 0.01}, id="gp-fd-unit-h.01"),
]


@pytest.fixture(scope="module")
def base_width_bert() -> torch.nn.Module:
    """BERT-base width (hidden 768, 12 heads, 3072) in 1 layer, no dropout, word embeddings scaled to pretrained
    bert-base-chinese's row norm ≈ 1.3 (random init gives 0.55): the activations bf16 must resolve a perturbation
    against are pretrained-sized. A 2,000-row vocabulary (the batch's ids modulo 2,000): a 21,128-row matrix
    would only make every step slower."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(
        TOKENIZER_DIR,
        vocab_size=SMALL_VOCAB,
        num_labels=15,
        num_hidden_layers=1,
        hidden_size=768,
        num_attention_heads=12,
        intermediate_size=3072,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        weight = model.get_input_embeddings().weight
        weight.mul_(1.3 / weight.norm(dim=1).mean())
    return model.train()


SMALL_VOCAB = 2000


def _step_gradient(model, batch, name: str, params: dict, autocast) -> list[torch.Tensor]:
    strategy = build_strategy(registry()[name].config_class(**params))
    strategy.setup(model)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same draws (random starts, noise, signs) in every step
    strategy.training_step(make_ctx(model, batch, autocast=autocast))
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]
    model.zero_grad(set_to_none=True)  # drops the references only: `grads` keeps the tensors
    return grads


def _regularizer_share(model, batch, name: str, params: dict, autocast) -> list[torch.Tensor]:
    on = _step_gradient(model, batch, name, params, autocast)
    off = _step_gradient(model, batch, name, params | REGULARIZER_OFF[name], autocast)
    return [a - b for a, b in zip(on, off, strict=True)]


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return sum(float(torch.dot(x.flatten().double(), y.flatten().double())) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("name", "params"), DIRECTION_CASES)
def test_the_regularizer_points_the_same_way_under_bf16(name, params, base_width_bert, batch):
    """VAT's ξ = 1e-3 probe, SMART's 1e-5 radii, a noise-only divergence and a finite difference divided by h compare
    passes closer than one bf16 step of the activations (relative 2⁻⁸): in bf16 they measure rounding. The
    regularizer's share of the parameter gradient must point the way fp32's does."""
    batch = Batch(batch.input_ids % SMALL_VOCAB, batch.attention_mask, batch.labels, batch.token_type_ids)
    fp32 = _regularizer_share(base_width_bert, batch, name, params, contextlib.nullcontext)
    bf16 = _regularizer_share(base_width_bert, batch, name, params, lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert _dot(fp32, fp32) > 0
    cosine = _dot(fp32, bf16) / math.sqrt(_dot(fp32, fp32) * _dot(bf16, bf16))
    assert cosine >= 0.9, f"cosine {cosine:.3f} between the bf16 and the fp32 regularizer gradient"


def test_full_precision_runs_the_layers_in_fp32_even_inside_an_outer_autocast(batch):
    """What the strategies above rely on: inside `full_precision()` the layers compute in fp32, also when a caller
    wrapped the whole step in autocast; outside, the run's bf16."""
    model = tiny_bert(dropout=0.0)
    seen: list[torch.dtype] = []
    model.bert.encoder.layer[0].intermediate.dense.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    ctx = _bf16_ctx(model, batch)
    assert ctx.half_precision
    ctx.forward()
    with ctx.full_precision():
        ctx.forward()
    with torch.autocast("cpu", dtype=torch.bfloat16), ctx.full_precision():
        ctx.forward()
    ctx.forward()
    assert seen == [torch.bfloat16, torch.float32, torch.float32, torch.bfloat16]
    assert not make_ctx(model, batch).half_precision
