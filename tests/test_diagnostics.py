"""Diagnostics (clue_adv/diagnostics.py, input_measures.py) against independent computations: the exact Hessian
trace, float64 finite differences, a by-hand FGM, clean evaluation; and the promise that measuring changes nothing."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SENTENCES, smoke_config, tiny_bert, tnews_labels

from clue_adv.data import ASSETS, read_split
from clue_adv.diagnostics import (
    DiagnosticsConfig,
    attack_metric,
    diagnose,
    diagnostic_batches,
    metric,
    parse_attack_metric,
    subset_indices,
)
from clue_adv.errors import ConfigError
from clue_adv.evaluate import evaluate
from clue_adv.input_measures import measure_batch, rademacher_probes
from clue_adv.regularizers.base import Batch


def _per_example_losses(model: torch.nn.Module, batch: Batch, x: torch.Tensor) -> torch.Tensor:
    out = model(inputs_embeds=x, attention_mask=batch.attention_mask, token_type_ids=batch.token_type_ids)
    return F.cross_entropy(out.logits, batch.labels, reduction="none")


def _exact_traces(model: torch.nn.Module, batch: Batch) -> list[float]:
    """tr ∇ₓ²ℓᵢ over example i's real tokens, one Hessian row per coordinate, each example on its own."""
    traces = []
    for i in range(batch.size):
        n = int(batch.attention_mask[i].sum())
        one = Batch(batch.input_ids[i : i + 1, :n], batch.attention_mask[i : i + 1, :n], batch.labels[i : i + 1])
        x = model.get_input_embeddings()(one.input_ids).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_per_example_losses(model, one, x).sum(), x, create_graph=True)
        flat = g.flatten()
        traces.append(
            sum(float(torch.autograd.grad(flat[k], x, retain_graph=True)[0].flatten()[k]) for k in range(flat.numel()))
        )
    return traces


def _dev_batch(tokenizer, count: int = 16) -> Batch:
    split = read_split(ASSETS / "tnews" / "dev.json", tnews_labels(), limit=count)
    enc = tokenizer(split["sentence"], padding=True, truncation=True, max_length=32, return_tensors="pt")
    return Batch(enc["input_ids"], enc["attention_mask"], torch.tensor(split["label"]), enc["token_type_ids"])


# -- curvature ---------------------------------------------------------------------------------------


def test_hutchinson_over_every_sign_vector_is_the_exact_trace(tokenizer):
    """For one 3-token title at hidden 4 (12 coordinates), the 4096 sign vectors spread as 64 probes over 64 copies:
    their mean vᵀHv is tr H exactly (the cross terms cancel over the whole cube), in float64."""
    model = tiny_bert(4, hidden=4, layers=1, dtype=torch.float64, dropout=0.0).eval()
    enc = tokenizer(["股"], return_tensors="pt")
    assert enc["input_ids"].shape[1] == 3
    one = Batch(enc["input_ids"], enc["attention_mask"], torch.tensor([2]), enc["token_type_ids"])
    (exact,) = _exact_traces(model, one)

    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=12)), dtype=torch.float64)  # 4096×12
    probes = signs.view(64, 64, 3, 4)  # probe p of copy b is sign vector 64·p + b
    copies = Batch(*(t.expand(64, -1) for t in (one.input_ids, one.attention_mask)), one.labels.expand(64))
    copies.token_type_ids = one.token_type_ids.expand(64, -1)
    measured = measure_batch(model, copies, probes=probes)
    assert float(measured.curvature.mean()) == pytest.approx(exact, rel=1e-9, abs=1e-12)
    assert abs(exact) > 1e-3  # a trace worth checking
    # Each copy alone saw 64 of the 4096 vectors: noisy, which is what the standard error says.
    assert float(measured.curvature.std()) > 1e-6 and bool((measured.curvature_se > 0).all())


def test_hutchinson_with_random_probes_is_within_its_standard_error(batch):
    """Padded batch, float64: each example's estimate from 300 seeded Rademacher probes is within 4 of its own
    standard errors of the exact trace over its real tokens, and the error bars are tight enough to matter."""
    model = tiny_bert(4, hidden=8, layers=1, dtype=torch.float64, dropout=0.0).eval()
    exact = torch.tensor(_exact_traces(model, batch), dtype=torch.float64)
    measured = measure_batch(model, batch, probes=300, generator=torch.Generator().manual_seed(0))
    assert not batch.attention_mask.bool().all()
    error = (measured.curvature - exact).abs()
    assert bool((error < 4 * measured.curvature_se).all()), (measured.curvature, exact, measured.curvature_se)
    assert bool((measured.curvature_se < 0.3 * exact.abs().max()).all())


def test_probes_are_signs_on_real_tokens_and_zero_on_padding(batch):
    mask = batch.attention_mask.unsqueeze(-1).double()
    probes = rademacher_probes(50, (*batch.input_ids.shape, 8), mask, torch.Generator().manual_seed(1))
    real = batch.attention_mask.bool()
    assert bool((probes[:, ~real] == 0).all())
    values = probes[:, real]
    assert bool((values.abs() == 1).all())
    assert abs(float(values.mean())) < 4 / math.sqrt(values.numel())  # fair coin


# -- gradient norm -----------------------------------------------------------------------------------


def test_input_grad_norm_equals_a_float64_finite_difference(batch):
    """‖∇ₓℓᵢ‖ from central differences over every coordinate of x, padding included (it must contribute nothing):
    one coordinate (t, h) is moved in every example at once, each example's loss depends on its own x only."""
    model = tiny_bert(4, hidden=8, layers=1, dtype=torch.float64, dropout=0.0).eval()
    x = model.get_input_embeddings()(batch.input_ids).detach()
    h = 1e-6
    grad = torch.zeros_like(x)
    with torch.no_grad():
        for t, k in itertools.product(range(x.shape[1]), range(x.shape[2])):
            step = torch.zeros_like(x)
            step[:, t, k] = h
            up, down = _per_example_losses(model, batch, x + step), _per_example_losses(model, batch, x - step)
            grad[:, t, k] = (up - down) / (2 * h)
    padding = ~batch.attention_mask.bool()
    assert float(grad[padding].abs().max()) < 1e-8
    measured = measure_batch(model, batch)
    torch.testing.assert_close(measured.input_grad_norm, grad.flatten(1).norm(dim=1), rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(measured.loss, _per_example_losses(model, batch, x), rtol=1e-12, atol=0)


# -- attacks -----------------------------------------------------------------------------------------


def test_attack_at_epsilon_zero_is_the_clean_model(batch):
    model = tiny_bert(4, hidden=16, layers=1, dropout=0.0).eval()
    with torch.no_grad():
        logits = model(**{k: getattr(batch, k) for k in ("input_ids", "attention_mask", "token_type_ids")}).logits
    batch.labels = (logits.argmax(-1) + 1) % 4  # wrong but for the first two
    batch.labels[:2] = logits[:2].argmax(-1)
    clean_correct = logits.argmax(-1) == batch.labels
    clean_loss = F.cross_entropy(logits, batch.labels, reduction="none")
    assert 0 < int(clean_correct.sum()) < batch.size
    measured = measure_batch(model, batch, epsilons=[0.0], pgd_steps=3)
    for correct, loss in ((measured.fgm_correct, measured.fgm_loss), (measured.pgd_correct, measured.pgd_loss)):
        assert torch.equal(correct[0], clean_correct)
        torch.testing.assert_close(loss[0], clean_loss, rtol=1e-5, atol=1e-6)


def test_pgd_accuracy_never_rises_with_epsilon_and_attacks_bite(tokenizer):
    """A fixed model (fitted to 16 real titles, so margins differ between them) over a fine ε grid: the PGD accuracy
    starts at the clean accuracy, falls monotonically to 0 (the attack works) through several levels, is never above
    FGM's (FGM alone may rise: it is a linear guess), and the loss it finds never falls."""
    model = tiny_bert(15, hidden=16, layers=1, dropout=0.0)
    batch = _dev_batch(tokenizer)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        optimizer.zero_grad()
        F.cross_entropy(logits, batch.labels).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    clean = float((logits.argmax(-1) == batch.labels).double().mean())
    assert clean > 0.5
    epsilons = [0.0, 0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0]
    measured = measure_batch(model, batch, epsilons=epsilons, pgd_steps=3)
    pgd = measured.pgd_correct.double().mean(1)
    assert float(pgd[0]) == clean and float(pgd[-1]) == 0.0
    assert bool((pgd[1:] <= pgd[:-1]).all()), pgd
    assert len(set(pgd.tolist())) > 3  # a gradual fall, not a cliff: the grid resolves it
    assert bool((measured.pgd_correct <= measured.fgm_correct).all())
    assert bool((measured.pgd_loss[1:] >= measured.pgd_loss[:-1]).all())
    assert bool((measured.pgd_loss >= measured.fgm_loss - 1e-6).all())


def test_fgm_is_the_relative_step_along_each_examples_gradient_and_padding_is_never_moved(batch):
    """By hand: r_i = ε‖x_i‖·∇ₓℓᵢ/‖∇ₓℓᵢ‖ on real tokens, the loss at x + r. Every input the attacks feed to the
    model equals x on padding bit for bit and lies within the largest ball on real tokens."""
    model = tiny_bert(4, hidden=8, layers=1, dtype=torch.float64, dropout=0.0).eval()
    x = model.get_input_embeddings()(batch.input_ids).detach()
    mask = batch.attention_mask.unsqueeze(-1).double()
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_per_example_losses(model, batch, xr).sum(), xr)
    g = g * mask
    norms = (x * mask).flatten(1).norm(dim=1).view(-1, 1, 1)
    epsilons = [0.05, 0.2]
    expected = []
    with torch.no_grad():
        for eps in epsilons:
            r = eps * norms * g / g.flatten(1).norm(dim=1).view(-1, 1, 1)
            expected.append(_per_example_losses(model, batch, x + r))

    seen: list[torch.Tensor] = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["inputs_embeds"].detach().clone()), with_kwargs=True
    )
    try:
        measured = measure_batch(model, batch, epsilons=epsilons, pgd_steps=4)
    finally:
        hook.remove()
    torch.testing.assert_close(measured.fgm_loss, torch.stack(expected), rtol=1e-10, atol=1e-12)
    padding = ~batch.attention_mask.bool()
    assert len(seen) == 1 + len(epsilons) * (1 + 4)  # clean, then per radius FGM + 4 PGD iterates
    largest = max(epsilons) * norms.flatten()
    for inputs in seen:
        assert torch.equal(inputs[padding], x[padding])
        assert bool(((inputs - x).flatten(1).norm(dim=1) <= largest * (1 + 1e-9)).all())


# -- the whole pass ----------------------------------------------------------------------------------


def _small_config(**fields) -> DiagnosticsConfig:
    return DiagnosticsConfig(**{"probes": 2, "epsilons": [0.05, 0.2], "pgd_steps": 2, **fields})


def test_diagnose_leaves_parameters_grads_mode_attention_and_random_state_as_they_were(batch):
    """With SDPA attention (no double backward on its fused kernel, so the curvature proves the switch to eager),
    in training mode, with gradients in .grad and a compiled forward: all as before afterwards, and the global
    random stream continues exactly where it was."""
    model = tiny_bert(4, hidden=16, layers=1, dropout=0.1, attn="sdpa").train()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.compile(backend="eager")  # lazy: nothing is compiled unless called
    compiled = model._compiled_call_impl
    torch.manual_seed(5)
    state = torch.get_rng_state()
    result = diagnose(model, [batch], [batch], _small_config(), seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert model.training and model.config._attn_implementation == "sdpa"
    assert model._compiled_call_impl is compiled
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]) and torch.equal(p.grad, grads[n]), n
    assert math.isfinite(result.metrics[metric("dev", "input_curvature_mean")])
    assert result.wall_time_s > 0 and result.metrics["diag/wall_time_s"] == result.wall_time_s


def test_loss_accuracy_and_gap_equal_a_clean_evaluation(batch, tokenizer):
    """dev/train loss and accuracy are evaluate()'s on the same batches (dropout off although the model is in
    training mode); the gap is dev minus train (loss), train minus dev (accuracy)."""
    model = tiny_bert(15, hidden=16, layers=1, dropout=0.3).train()
    dev = _dev_batch(tokenizer)
    as_dict = {"input_ids": dev.input_ids, "attention_mask": dev.attention_mask, "labels": dev.labels}
    train = {k: getattr(batch, k) for k in ("input_ids", "attention_mask", "labels")}
    m = diagnose(model, [as_dict], [train], _small_config(probes=0, epsilons=[]), seed=1).metrics
    for split, data in (("dev", as_dict), ("train", train)):
        want = evaluate(model, [data], torch.device("cpu"), 15)
        assert m[metric(split, "accuracy")] == pytest.approx(want["accuracy"], abs=1e-12)
        assert m[metric(split, "loss")] == pytest.approx(want["loss"], rel=1e-5)
    assert m[metric("gap", "loss")] == pytest.approx(m[metric("dev", "loss")] - m[metric("train", "loss")])
    assert m[metric("gap", "accuracy")] == pytest.approx(m[metric("train", "accuracy")] - m[metric("dev", "accuracy")])
    # Only what was asked for: no curvature, no attacks.
    assert not any("curvature" in k or "eps=" in k for k in m)


def test_same_seed_same_probes_whatever_the_global_random_state(batch):
    model = tiny_bert(4, hidden=16, layers=1, dropout=0.0)
    config = _small_config()

    def run(seed: int, global_seed: int) -> dict[str, float]:
        torch.manual_seed(global_seed)
        metrics = diagnose(model, [batch], [batch], config, seed=seed).metrics
        return {k: v for k, v in metrics.items() if k != "diag/wall_time_s"}

    first = run(1, 0)
    assert run(1, 123) == first
    other = run(2, 0)
    assert other[metric("dev", "input_curvature_mean")] != first[metric("dev", "input_curvature_mean")]
    # dev and train draw their own probes: the same batch on both sides gets different estimates
    assert first[metric("dev", "input_curvature_mean")] != first[metric("train", "input_curvature_mean")]
    assert first[metric("dev", "input_grad_norm_mean")] == first[metric("train", "input_grad_norm_mean")]


def test_subsets_are_seeded_by_seed_and_split():
    a = subset_indices(1000, 128, 1, "dev")
    assert a == subset_indices(1000, 128, 1, "dev") and a == sorted(set(a)) and len(a) == 128
    assert a != subset_indices(1000, 128, 2, "dev") and a != subset_indices(1000, 128, 1, "train")
    assert subset_indices(50, 128, 1, "dev") == list(range(50))


def test_diagnostic_batches_take_the_dev_subset_and_as_many_train_examples(tokenizer):
    from datasets import Dataset

    def dataset(n: int, offset: int) -> Dataset:
        enc = tokenizer([SENTENCES[i % 4] * (1 + i % 3) for i in range(n)], truncation=True, max_length=32)
        return Dataset.from_dict({**enc, "labels": [(i + offset) % 4 for i in range(n)]})

    config = DiagnosticsConfig(examples=20, batch_size=8)
    dev, train = diagnostic_batches(dataset(30, 0), dataset(100, 1), tokenizer, config, seed=3)
    assert [len(b["labels"]) for b in dev] == [8, 8, 4] and [len(b["labels"]) for b in train] == [8, 8, 4]
    lengths = [int(n) for b in dev for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths)  # little padding
    small = DiagnosticsConfig(examples=50, batch_size=64)
    dev, train = diagnostic_batches(dataset(30, 0), dataset(100, 1), tokenizer, small, seed=3)
    assert len(dev[0]["labels"]) == 30 and len(train[0]["labels"]) == 30  # all of dev, as many train


# -- config and names --------------------------------------------------------------------------------


def test_config_block_defaults_switch_and_bad_values():
    cfg = smoke_config(diagnostics={})  # the schema's defaults (smoke_config itself turns them off)
    assert cfg.diagnostics.enabled and cfg.diagnostics.when == "end"
    assert not smoke_config(diagnostics__enabled=False).diagnostics.enabled
    assert smoke_config(diagnostics__epsilons=[0.1, 0.01, 0.1]).diagnostics.epsilons == [0.01, 0.1]
    assert DiagnosticsConfig().resolved_seed(7) == 7 and DiagnosticsConfig(seed=0).resolved_seed(7) == 0
    with pytest.raises(ConfigError) as info:
        smoke_config(diagnostics__epsilons=[0.0], diagnostics__when="always", diagnostics__probs=2)
    text = "\n".join(info.value.problems)
    assert "diagnostics.epsilons: every ε must be > 0" in text
    assert "diagnostics.when" in text and "diagnostics.probs: unknown field (did you mean 'probes'?)" in text


def test_attack_metric_names_round_trip():
    name = attack_metric("pgd", "accuracy", 0.03)
    assert name == "diag/dev/pgd_accuracy/eps=0.03"
    assert parse_attack_metric(name) == ("pgd", "accuracy", 0.03)
    assert parse_attack_metric(attack_metric("fgm", "loss", 1e-5)) == ("fgm", "loss", 1e-5)
    assert parse_attack_metric("diag/dev/input_grad_norm_mean") is None
    assert parse_attack_metric("diag/train/pgd_accuracy/eps=0.1") is None
    assert metric("dev", "input_curvature_mean") == "diag/dev/input_curvature_mean"
