"""What every registered strategy must do, whoever wrote it: new strategies are picked up automatically."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import make_ctx, tiny_bert

from clue_adv.regularizers import build_strategy, registry
from clue_adv.regularizers.perturb import PerturbationConfig

NAMES = list(registry())
PERTURBING = [name for name, cls in registry().items() if issubclass(cls.config_class, PerturbationConfig)]

# Sizes for a random-init tiny BERT. Its word-embedding outputs are ~0.02 per coordinate (an example's norm
# ≈ 0.3-0.5 here), several times smaller than pretrained bert-base-chinese's, so absolute ε tuned for the
# pretrained model (1.0 for PGD/VAT) would swamp the input (REGULARIZERS.md: FGM at such ε collapsed to the
# majority class). ε relative to each example's own norm is scale-free; 5% keeps the perturbation a
# perturbation. Strategies not listed get `epsilon_unit: relative` and, if they have one, `epsilon: 0.05`.
SMALL: dict[str, dict[str, Any]] = {
    "pgd": {"epsilon": 0.05, "alpha": 0.02},
    "freelb": {"adv_lr": 0.02, "init_magnitude": 0.05},
    "vat": {"epsilon": 0.05},
    "smart": {},  # its published ε = 1e-5 is already tiny
}


def small_config(name: str, **overrides: Any):
    cls = registry()[name].config_class
    values: dict[str, Any] = {}
    if issubclass(cls, PerturbationConfig):
        values["epsilon_unit"] = "relative"
        values.update(SMALL.get(name, {"epsilon": 0.05} if "epsilon" in cls.model_fields else {}))
    values.update(overrides)
    return cls(**values)


def grads_after_step(strategy, model, batch, seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    result = strategy.training_step(make_ctx(model, batch))
    return float(result.loss), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", NAMES)
def test_reported_cost_is_what_one_step_runs(batch, name):
    strategy = build_strategy(registry()[name].config_class())
    model = tiny_bert()
    strategy.setup(model)
    ctx = make_ctx(model, batch)
    strategy.training_step(ctx)
    cost = strategy.cost()
    assert (ctx.counter.forward, ctx.counter.backward) == (cost.forward, cost.backward)
    assert (ctx.counter.double_backward > 0) == cost.double_backward


@pytest.mark.parametrize("name", NAMES)
def test_one_step_is_deterministic_under_a_seed(batch, name):
    """Same seed, same model: the same loss and bit-identical gradients (dropout and random starts included)."""
    runs = []
    for _ in range(2):
        model = tiny_bert(dropout=0.1)
        strategy = build_strategy(small_config(name))
        strategy.setup(model)
        runs.append(grads_after_step(strategy, model, batch, seed=123))
    (loss_a, grads_a), (loss_b, grads_b) = runs
    assert loss_a == loss_b
    assert grads_a.keys() == grads_b.keys() and grads_a
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    assert all(torch.isfinite(g).all() for g in grads_a.values())


@pytest.mark.parametrize("name", NAMES)
def test_training_step_changes_no_parameter(batch, name):
    model = tiny_bert()
    strategy = build_strategy(small_config(name))
    strategy.setup(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy.training_step(make_ctx(model, batch))
    after = model.state_dict()
    assert before.keys() == after.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"training_step modified {changed}"


@pytest.mark.parametrize("name", NAMES)
def test_a_few_optimizer_steps_on_one_batch_lower_the_loss(batch, name):
    model = tiny_bert(dropout=0.0)
    strategy = build_strategy(small_config(name))
    strategy.setup(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def clean_loss() -> float:
        with torch.no_grad():
            ctx = make_ctx(model, batch)
            return float(ctx.loss(ctx.forward()))

    torch.manual_seed(0)
    start = clean_loss()
    for _ in range(5):
        optimizer.zero_grad(set_to_none=True)
        strategy.training_step(make_ctx(model, batch))
        optimizer.step()
        strategy.after_optimizer_step(model)
    assert clean_loss() < start - 0.1


@pytest.mark.parametrize("name", NAMES)
def test_every_config_field_has_a_description(name):
    cls = registry()[name].config_class
    undocumented = [key for key, field in cls.model_fields.items() if not (field.description or "").strip()]
    assert not undocumented
    assert registry()[name].summary


@pytest.mark.parametrize("name", NAMES)
def test_an_unused_parameter_without_gradient_is_fine(batch, name):
    model = tiny_bert()
    model.unused = torch.nn.Linear(3, 3)  # registered but never called: .grad stays None
    strategy = build_strategy(small_config(name))
    strategy.setup(model)
    result = strategy.training_step(make_ctx(model, batch))
    assert torch.isfinite(result.loss)
    assert model.unused.weight.grad is None


@pytest.mark.parametrize("name", PERTURBING)
def test_embedding_matrix_target_runs_and_never_writes_the_matrix(batch, name):
    model = tiny_bert()
    weight = model.get_input_embeddings().weight
    before = weight.detach().clone()
    strategy = build_strategy(small_config(name, target="embedding_matrix"))
    strategy.setup(model)
    ctx = make_ctx(model, batch)
    result = strategy.training_step(ctx)
    assert torch.equal(weight.detach(), before)
    assert torch.isfinite(result.loss)
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    cost = strategy.cost()
    assert (ctx.counter.forward, ctx.counter.backward) == (cost.forward, cost.backward)


def test_the_registry_holds_the_adversarial_family():
    # Exactly the ten strategies the study compares: a missing one, or a new one not added here on purpose, fails.
    assert set(NAMES) == {
        "none",
        "gaussian_noise",
        "consistency",
        "fgm",
        "pgd",
        "freelb",
        "vat",
        "smart",
        "gradient_penalty",
        "jacobian_penalty",
    }


def test_teacher_copy_is_independent_of_the_model(batch):
    """A strategy's setup() may keep copies of the model (SMART's teacher); they must not alias its tensors."""
    model = tiny_bert()
    for name in NAMES:
        strategy = build_strategy(small_config(name))
        strategy.setup(model)
        for value in vars(strategy).values():
            if isinstance(value, torch.nn.Module):
                ours = {p.data_ptr() for p in model.parameters()}
                assert not ours & {p.data_ptr() for p in value.parameters()}, name


@pytest.mark.parametrize("name", NAMES)
def test_label_smoothing_reaches_every_task_loss(batch, name, monkeypatch):
    """Label smoothing is a loss option usable with any strategy: every cross-entropy a strategy computes (clean,
    adversarial, both R-Drop branches) must go through ctx.loss, which applies it. A strategy calling
    F.cross_entropy itself would train its extra terms without smoothing."""
    import torch.nn.functional as F

    from clue_adv.regularizers.base import StepContext

    real_ce, real_loss = F.cross_entropy, StepContext.loss
    smoothing_seen: list[float] = []
    through_ctx: list[int] = []

    def cross_entropy(*args: Any, **kwargs: Any) -> torch.Tensor:
        smoothing_seen.append(kwargs.get("label_smoothing", 0.0))
        return real_ce(*args, **kwargs)

    def loss(self: StepContext, logits: torch.Tensor) -> torch.Tensor:
        through_ctx.append(1)
        return real_loss(self, logits)

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    monkeypatch.setattr(StepContext, "loss", loss)
    strategy = build_strategy(small_config(name))
    model = tiny_bert(4, hidden=16, layers=1)
    strategy.setup(model)
    strategy.training_step(make_ctx(model, batch, label_smoothing=0.1))
    assert through_ctx, "the task loss did not go through ctx.loss"
    assert smoothing_seen and all(s == 0.1 for s in smoothing_seen), smoothing_seen
