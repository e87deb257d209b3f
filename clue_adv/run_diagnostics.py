"""The diagnostics inside a training run (docs/DIAGNOSTICS.md): which model is measured when, what is kept for
it, and the records it gives.

`when: end` measures, once training is over, the final model and the best one (highest dev accuracy). The best
model's weights are copied to the CPU at its evaluation (save_model may be off) and put into the model only for
its measurement; when the best model is the final one it is measured once. `when: every_eval` measures after
every evaluation; the best and final results are then those of the best and the last evaluation (the last
evaluation is always of the final model), so nothing is kept or measured again at the end.

The subsets are built once per run from the diagnostics seed: runs with the same seed are measured on the same
examples with the same probes (paired). Measuring changes nothing in training (`diagnose` leaves the model, its
gradients and the random state as they were), and its wall time is counted here, apart from training's.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from clue_adv.diagnostics import DiagnosticsConfig, diagnose, diagnostic_batches

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

Record = dict[str, Any]


def _cpu_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


class RunDiagnostics:
    """One run's diagnostics: `evaluated` after each dev evaluation, `finished` once training is over.
    `results` ("best", "final": epoch, step and the `diag/` metrics) and `wall_time_s` go into summary.json."""

    def __init__(self, config: DiagnosticsConfig, seed: int, dev_batches: list, train_batches: list) -> None:
        self.config = config
        self.seed = seed
        self.dev_batches = dev_batches
        self.train_batches = train_batches
        self.results: dict[str, Record] = {}
        self.wall_time_s = 0.0  # measuring and copying weights, over every session of the run (resumes included)
        self.best_weights: dict[str, torch.Tensor] | None = None  # when: end, unless the model has them itself
        self.best_is_latest = False  # the latest evaluation was the best so far: the model holds the best weights

    @classmethod
    def build(
        cls,
        config: DiagnosticsConfig,
        run_seed: int,
        dev: Dataset,
        train: Dataset,
        tokenizer: PreTrainedTokenizerBase,
        pad_to_multiple_of: int | None = None,
    ) -> RunDiagnostics | None:
        """The run's diagnostics with their seeded subsets, or None when `config.enabled` is off."""
        if not config.enabled:
            return None
        seed = config.resolved_seed(run_seed)
        start = time.perf_counter()
        dev_batches, train_batches = diagnostic_batches(dev, train, tokenizer, config, seed, pad_to_multiple_of)
        diagnostics = cls(config, seed, dev_batches, train_batches)
        diagnostics.wall_time_s = time.perf_counter() - start
        return diagnostics

    def evaluated(self, model: torch.nn.Module, evaluation: Record, is_best: bool) -> list[Record]:
        """After the dev evaluation `evaluation` (epoch, step, accuracy...) of `model`: measure it (every_eval)
        or keep its weights when it is the best so far (end). Returns the metrics.jsonl records to write."""
        start = time.perf_counter()
        self.best_is_latest = is_best
        records = []
        if self.config.when == "every_eval":
            measured = self._measure(model, evaluation)
            self.results["final"] = measured
            if is_best:
                self.results["best"] = measured
            records.append({"type": "diagnostics", "model": "eval", **measured})
        elif is_best:
            self.best_weights = _cpu_copy(model)
        self.wall_time_s += time.perf_counter() - start
        return records

    def finished(self, model: torch.nn.Module, best: Record, final: Record) -> list[Record]:
        """Once training is over (`final`: the last evaluation, of the model as it is now; `best`: the best one):
        with `when: end` measure the final model and the best one. Returns the records to write."""
        if self.config.when != "end":
            return []
        start = time.perf_counter()
        self.results["final"] = self._measure(model, final)
        if self.best_is_latest:
            self.results["best"] = self.results["final"]
        else:
            if self.best_weights is None:
                raise RuntimeError("the best model's weights were not kept")  # a bug, not a user's mistake
            final_weights = _cpu_copy(model)
            model.load_state_dict(self.best_weights)
            try:
                self.results["best"] = self._measure(model, best)
            finally:
                model.load_state_dict(final_weights)
        self.wall_time_s += time.perf_counter() - start
        return [{"type": "diagnostics", "model": name, **self.results[name]} for name in ("best", "final")]

    def _measure(self, model: torch.nn.Module, evaluation: Record) -> Record:
        result = diagnose(model, self.dev_batches, self.train_batches, self.config, seed=self.seed)
        return {"epoch": evaluation["epoch"], "step": evaluation["step"], **result.metrics}

    def state_dict(self) -> dict[str, Any]:
        """What an epoch checkpoint keeps (it is written right after an evaluation): the results and time so far,
        and the best weights unless the model itself holds them."""
        keep = self.best_weights is not None and not self.best_is_latest
        return {
            "results": self.results,
            "wall_time_s": self.wall_time_s,
            "best_is_latest": self.best_is_latest,
            "best_weights": self.best_weights if keep else {},
        }

    def load_state_dict(self, state: dict[str, Any], model: torch.nn.Module) -> None:
        """Put back what `state_dict` returned; `model` already has the checkpoint's weights."""
        self.results = state["results"]
        self.wall_time_s += float(state["wall_time_s"])  # this session's so far (the subsets) + the earlier ones
        self.best_is_latest = bool(state["best_is_latest"])
        if self.config.when == "end":
            self.best_weights = _cpu_copy(model) if self.best_is_latest else state["best_weights"]
