"""Checks that only mean something on CUDA: bf16 autocast kernels, fused SDPA attention, CUDA RNG for dropout."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_ctx, smoke_config, tiny_bert

from clue_adv.errors import ConfigError
from clue_adv.regularizers import build_strategy, registry
from clue_adv.regularizers.base import Batch
from clue_adv.regularizers.fgm import FGMConfig
from clue_adv.regularizers.gradient_penalty import GradientPenaltyConfig
from clue_adv.regularizers.perturb import same_dropout
from clue_adv.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture
def cuda_batch(batch) -> Batch:
    return Batch.from_mapping(
        {
            "input_ids": batch.input_ids,
            "attention_mask": batch.attention_mask,
            "token_type_ids": batch.token_type_ids,
            "labels": batch.labels,
        },
        torch.device("cuda"),
    )


def _bf16_ctx(model, batch):
    return make_ctx(model, batch, autocast=lambda: torch.autocast("cuda", dtype=torch.bfloat16))


CONFIGS = [
    FGMConfig(epsilon=0.05, epsilon_unit="relative"),
    GradientPenaltyConfig(),
    GradientPenaltyConfig(mode="finite_difference"),  # no double backward: runs on fused SDPA
    *(c.config_class() for name, c in registry().items() if name not in ("fgm", "gradient_penalty")),
]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.name}-{getattr(c, 'mode', '')}".rstrip("-"))
def test_bf16_autocast_step_on_cuda_is_finite_with_fp32_grads(config, cuda_batch):
    strategy = build_strategy(config)
    # eager only where needed: a double backward differentiates a gradient, which fused SDPA kernels cannot
    model = tiny_bert(attn="eager" if strategy.cost().double_backward else "sdpa").cuda()
    strategy.setup(model)
    model.zero_grad(set_to_none=True)
    result = strategy.training_step(_bf16_ctx(model, cuda_batch))
    assert math.isfinite(float(result.loss))
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads
    assert all(g.dtype == torch.float32 for g in grads)  # master weights stay fp32 under autocast
    assert all(bool(torch.isfinite(g).all()) for g in grads)


def test_sdpa_with_a_double_backward_strategy_is_a_clear_config_error():
    with pytest.raises(ConfigError) as info:
        smoke_config(strategy={"name": "gradient_penalty"}, model__attn_implementation="sdpa", device="cuda")
    assert "double backward" in str(info.value)  # str() lists every problem, each naming its field


def test_auto_attention_runs_a_double_backward_strategy_on_cuda(tmp_path):
    # auto picks eager attention for it; on CUDA the fused SDPA path would otherwise fail in the double backward
    cfg = smoke_config(
        strategy={"name": "gradient_penalty"},
        device="cuda",
        data__max_train_samples=32,
        data__max_eval_samples=32,
    )
    outcome = train(cfg, tmp_path, show_progress=False)
    assert outcome.summary["status"] == "completed"
    assert all(math.isfinite(h["loss"]) for h in outcome.summary["dev_history"])


@pytest.mark.parametrize("attn", ["eager", "sdpa"])  # the finite-difference penalty replays masks under SDPA
def test_same_dropout_repeats_the_masks_on_cuda(cuda_batch, attn):
    model = tiny_bert(dropout=0.3, attn=attn).cuda().train()
    ctx = make_ctx(model, cuda_batch)
    torch.manual_seed(0)
    with same_dropout(ctx):
        first = ctx.forward()
    second = ctx.forward()  # the RNG was restored, so the same masks again
    third = ctx.forward()  # the RNG moved on: fresh masks
    torch.testing.assert_close(first, second)
    assert not torch.allclose(second, third)


def test_a_deterministic_cuda_run_with_loader_workers_repeats_itself(tmp_path):
    """Issue 17.4 on a real GPU: loader workers into pinned memory, `deterministic: true`, the loop's once-per-window
    reads: two runs of one config give the same metrics lines and results, and the summary gives the reserved peak."""
    from clue_adv.rundir import read_jsonl

    cfg = smoke_config(device="cuda", deterministic=True, data__max_train_samples=128, data__max_eval_samples=64)
    first = train(cfg, tmp_path / "a", show_progress=False)
    second = train(cfg, tmp_path / "b", show_progress=False)

    def lines(outcome):
        return [
            {k: v for k, v in r.items() if k != "step_time_s"} for r in read_jsonl(outcome.directory / "metrics.jsonl")
        ]

    assert first.summary["status"] == second.summary["status"] == "completed"
    assert lines(first) == lines(second)
    assert first.summary["final_train_loss"] == second.summary["final_train_loss"]
    assert first.summary["peak_memory_reserved_mb"] >= first.summary["peak_memory_mb"] > 0
