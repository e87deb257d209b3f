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


@pytest.mark.parametrize("name", list(registry()))
def test_a_bf16_autocast_step_is_finite(name, batch):
    model = tiny_bert(dropout=0.1, attn="eager")
    strategy = build_strategy(_config(name))
    strategy.setup(model)
    model.zero_grad(set_to_none=True)
    ctx = make_ctx(model, batch, autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    seen_dtypes = []
    original = ctx.forward

    def forward(x=None):
        if x is not None:
            seen_dtypes.append(x.dtype)  # what goes into the model: x (+ r), built in fp32
        logits = original(x)
        assert logits.dtype == torch.float32  # losses and divergences in fp32 at least
        return logits

    ctx.forward = forward
    result = strategy.training_step(ctx)
    assert math.isfinite(float(result.loss))
    assert all(math.isfinite(v) or math.isnan(v) for v in result.metrics.values())  # nan = "not applicable"
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert all(d == torch.float32 for d in seen_dtypes)
