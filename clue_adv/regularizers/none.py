"""Plain fine-tuning: the baseline every other strategy is compared against."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from clue_adv.regularizers import register
from clue_adv.regularizers.base import StepContext, StepCost, StepResult, Strategy, StrategyConfig


class NoneConfig(StrategyConfig):
    name: Literal["none"] = Field("none", description="Plain fine-tuning (the baseline).")


@register
class NoRegularizer(Strategy):
    config_class = NoneConfig
    summary = "plain fine-tuning on the task loss (baseline)"
    accumulation = "Split-invariant: the objective is the mean loss over the examples of the window."

    def cost(self) -> StepCost:
        return StepCost(forward=1, backward=1)

    def training_step(self, ctx: StepContext) -> StepResult:
        loss = ctx.loss(ctx.forward())
        ctx.backward(loss)
        return StepResult(loss.detach())
