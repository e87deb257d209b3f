"""Estimate, from FLOPs, the GPU time of a sweep (default: sweeps/reproduce.yaml, 30 runs) on one H100.

No GPU was used: this is arithmetic on counted tokens, not a measurement. What is computed and what is assumed:

- **Cells** come from the sweep through clue_adv's own planner (`clue_adv.sweep.load_plan`): task, strategy,
  seed, epochs, batch size, max length, head, length grouping, eval batch size, exactly as `clue-adv sweep`
  would run them.
- **Tokens** (computed): the real CLUE text is tokenized with the bundled bert-base-chinese tokenizer and batched
  the way clue_adv batches it: the project's own samplers (`RandomSampler`, or `LengthGroupedSampler` with
  `data.length_grouped: true`) on the run's seed, each batch padded to its longest example rounded up to a
  multiple of 8 (clue_adv pads so on CUDA); dev batches sorted by length as `eval_loader` does. Padded positions
  are counted because the GPU computes them. TNEWS: the full train set from ../shared/data/clue. IFLYTEK: its
  train set is not available offline, so its dev set stands in for the length distribution, tiled to the
  official train size (12,133). A bundled sample is used, tiled likewise, when ../shared is missing.
- **FLOPs** (computed): a forward + backward costs 6·N per token for the N non-embedding parameters applied at
  every position (counted on a meta-device model built from the bundled config.json) plus 12·L·d·s per token for
  attention over a padded length s (the PaLM paper's 6N + 12·L·H·Q·T), plus 6 per head parameter per sequence.
  A forward is a third of that, a backward two thirds. A strategy's training step is the passes its own
  `cost()` declares, with a double backward counted as `--double-backward-weight` (default 2) backwards.
  Every epoch ends with one forward over the dev set, as clue_adv's training loop does.
- **Throughput** (assumed, not measured): H100 SXM bf16 dense peak 989 TFLOP/s times a model-FLOPs utilization
  (`--mfu`, default 0.35). Start-up, data loading and fixed per-step costs (kernel launches, optimizer) are not in
  the FLOP count; the output says how much each millisecond of per-step overhead would add.
- **Early stopping** (`--early-stopping FILE --patience 3 5`, measured, then transferred): FILE is
  scripts/early_stopping_fidelity.py's JSON (results/proxy-tnews/early-stopping.json: the proxy study's full dev
  curves, tiny model, TNEWS). Each reproduction strategy is matched to the proxy's runs of the same strategy
  (`PROXY_TAGS`); its epochs to the best dev epoch are their median best epoch, rounded up; under patience p each
  cell then trains min(its epochs, that + p) epochs (the rule stops p evaluations after the last improvement, so a
  run that improves no more after its best stops there). Assumed, and said in the output: that BERT-base reaches its
  best dev epoch as early, in epochs, as the tiny model does, on IFLYTEK as on TNEWS.

    python scripts/estimate_reproduce.py                          # sweeps/reproduce.yaml, writes results/bench/
    python scripts/estimate_reproduce.py --early-stopping results/proxy-tnews/early-stopping.json --patience 3 5
    python scripts/estimate_reproduce.py --mfu 0.5 --sweep sweeps/all-strategies.yaml --output-dir /tmp/est
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_common as common  # noqa: E402  (sets the offline environment before transformers is imported)
import torch  # noqa: E402

from clue_adv.config import RunConfig, load_config  # noqa: E402
from clue_adv.data import ASSETS, LengthGroupedSampler, read_split  # noqa: E402
from clue_adv.regularizers import build_strategy  # noqa: E402
from clue_adv.regularizers.base import StepCost  # noqa: E402
from clue_adv.sweep import load_plan, load_sweep  # noqa: E402

# NVIDIA's H100 SXM datasheet gives 1,979 TFLOP/s for bf16 "with sparsity"; dense matrix math is half of that.
H100_SXM_BF16_DENSE_TFLOPS = 989.0
DEFAULT_MFU = 0.35
MFU_TABLE = (0.2, 0.35, 0.5)
TARGET_MINUTES = 20.0
# clue_adv pads batches to a multiple of 8 on CUDA (clue_adv.train.pad_multiple_for); the estimate is for a GPU.
PAD_MULTIPLE = 8
# Official CLUE split sizes, as ../shared/data/clue/SOURCES.md records them (TNEWS: 53,360 train and 10,000 dev
# records present; IFLYTEK: 2,599 dev present, train "12,133 records" missing).
OFFICIAL_SIZES: dict[str, dict[str, int]] = {
    "tnews": {"train": 53_360, "dev": 10_000},
    "iflytek": {"train": 12_133, "dev": 2_599},
}
REPO = common.REPO
DEFAULT_SWEEP = REPO / "sweeps" / "reproduce.yaml"
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data" / "clue"
CPU_STRATEGY_BENCH = common.RESULTS / "strategies-cpu.json"
STEM = "reproduce-estimate"
DEFAULT_PATIENCE = (3, 5)
# The reproduction sweep's strategy tags -> the proxy study's tag for the same strategy (sweeps/proxy-tnews.yaml
# names the study's gradient penalty `gp`). A tag not listed is looked up as itself.
PROXY_TAGS: dict[str, str] = {"none": "none", "fgm-study": "fgm-study", "gp-study": "gp"}


# ------------------------------------------------------------------------------------------------------
# FLOPs of the model


@dataclass(frozen=True)
class ModelFlops:
    """The parameter counts and shape that fix BERT's FLOPs per token and per sequence."""

    layers: int
    hidden: int
    token_params: int  # non-embedding parameters applied at every position: the encoder layers
    sequence_params: int  # applied once per sequence: the pooler (head=pooler) and the classifier

    def train_flops(self, tokens: float, tokens_x_length: float, sequences: float) -> float:
        """FLOPs of one forward + backward over batches holding `tokens` padded positions in all, where
        `tokens_x_length` = Σ over batches of (batch size · padded length²) and `sequences` examples.

        6 per parameter per token: 2 in the forward (a multiply-add), 4 in the backward (activation and weight
        gradients). Attention: QKᵀ and A·V are 2·s·d multiply-adds per token per layer, so 4·s·d FLOPs forward and
        12·s·d forward + backward; embeddings (lookups) and elementwise work are left out, as usual."""
        return (
            6 * self.token_params * tokens
            + 12 * self.layers * self.hidden * tokens_x_length
            + 6 * self.sequence_params * sequences
        )

    def forward_flops(self, tokens: float, tokens_x_length: float, sequences: float) -> float:
        """A forward is a third of a forward + backward (the backward does twice the forward's products)."""
        return self.train_flops(tokens, tokens_x_length, sequences) / 3


def bert_config(architecture: dict[str, Any] | None = None, num_labels: int = 2) -> Any:
    """The bundled bert-base-chinese config.json (the shipped configs' model), with optional overrides."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(common.TOKENIZER_DIR, num_labels=num_labels, **(architecture or {}))


def model_flops(config: Any, head: str = "pooler") -> ModelFlops:
    """Count parameters on a model built on the meta device (no memory, no weights) the way clue_adv builds it:
    HF's sequence classifier, with the pooler replaced by the raw [CLS] vector for `head: cls`."""
    from transformers import AutoModelForSequenceClassification

    from clue_adv.model import use_cls_vector

    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    if head == "cls":
        use_cls_vector(model)
    token = sequence = 0
    for name, param in model.named_parameters():
        if ".embeddings." in f".{name}":
            continue  # lookups, not matrix products
        if ".encoder." in f".{name}":
            token += param.numel()
        else:  # pooler and classifier act on the [CLS] vector only
            sequence += param.numel()
    return ModelFlops(config.num_hidden_layers, config.hidden_size, token, sequence)


def _batch_note(declared: dict[str, Any]) -> str:
    """Marks passes that run on the batch stacked k times (their FLOPs count k times in the multiplier)."""
    factor = declared.get("batch_factor", 1)
    return f" (each on {factor}×B)" if factor != 1 else ""


def step_multiplier(cost: StepCost, double_backward_weight: float = 2.0) -> float:
    """A strategy's training FLOPs per step, relative to plain fine-tuning (one forward + one backward = 3
    forward units). A backward is 2 forward units; a double backward (a backward through a create_graph
    backward) is counted as `double_backward_weight` backwards: an assumption, stated in the output."""
    backward_units = 2.0 * cost.backward_at_batch
    if cost.double_backward:
        backward_units += 2.0 * (double_backward_weight - 1.0) * cost.batch_factor
    return (cost.forward_at_batch + backward_units) / 3.0


def analytic_step_multiplier(cost: StepCost) -> float:
    """The alternative count for a double-backward step, for comparison with the convention above: each
    create_graph backward yields input gradients only (no weight gradients: 1 unit), and the final backward runs
    through the forward graph (2 units) and through each create_graph backward's graph (2 units each)."""
    if not cost.double_backward:
        return step_multiplier(cost)
    graphs = cost.backward_at_batch - cost.batch_factor
    return (cost.forward_at_batch + graphs * 1.0 + 2.0 * cost.batch_factor + graphs * 2.0) / 3.0


# ------------------------------------------------------------------------------------------------------
# Tokens, batched as clue_adv batches them


@dataclass(frozen=True)
class EpochTokens:
    """What one pass over a split costs in token positions."""

    examples: int
    batches: int
    real_tokens: float  # tokens of the examples themselves ([CLS] and [SEP] included)
    padded_tokens: float  # Σ batch size · padded length: the positions the GPU computes
    padded_tokens_x_length: float  # Σ batch size · padded length²: what attention scales with

    @property
    def padding_share(self) -> float:
        return 1.0 - self.real_tokens / self.padded_tokens


def padded_length(longest: int, multiple: int | None = PAD_MULTIPLE) -> int:
    """DataCollatorWithPadding(pad_to_multiple_of=multiple): the longest example, rounded up."""
    return longest if not multiple else -(-longest // multiple) * multiple


def batch_tokens(lengths: Sequence[int], order: Sequence[int], batch_size: int, multiple: int | None) -> EpochTokens:
    """Token counts of the batches that `order` makes (the last one may be short: the loader keeps it)."""
    real = padded = padded_sq = 0
    batches = 0
    for start in range(0, len(order), batch_size):
        chunk = [lengths[i] for i in order[start : start + batch_size]]
        s = padded_length(max(chunk), multiple)
        real += sum(chunk)
        padded += len(chunk) * s
        padded_sq += len(chunk) * s * s
        batches += 1
    return EpochTokens(len(order), batches, real, padded, padded_sq)


def mean_tokens(epochs: Sequence[EpochTokens]) -> EpochTokens:
    n = len(epochs)
    return EpochTokens(
        epochs[0].examples,
        epochs[0].batches,
        sum(e.real_tokens for e in epochs) / n,
        sum(e.padded_tokens for e in epochs) / n,
        sum(e.padded_tokens_x_length for e in epochs) / n,
    )


def train_epoch_orders(
    lengths: Sequence[int], batch_size: int, length_grouped: bool, seed: int, epochs: int
) -> Iterator[list[int]]:
    """The example order of each of the first `epochs` epochs, from the samplers clue_adv.data.train_loader
    builds (same classes, same window of 50 batches, a generator seeded with the run's seed that carries over
    from epoch to epoch), so the padding is the project's, not a model of it."""
    generator = torch.Generator().manual_seed(seed)
    if length_grouped:
        sampler: Iterable[int] = LengthGroupedSampler(list(lengths), 50 * batch_size, generator)
    else:
        sampler = torch.utils.data.RandomSampler(range(len(lengths)), generator=generator)
    for _ in range(epochs):
        yield list(iter(sampler))


def train_tokens(
    lengths: Sequence[int], batch_size: int, length_grouped: bool, seed: int, epochs: int = 2
) -> tuple[EpochTokens, float]:
    """Mean padded tokens per epoch over the first `epochs` epochs, and the largest relative deviation of one
    epoch from that mean (how much the shuffling moves the count)."""
    per_epoch = [
        batch_tokens(lengths, order, batch_size, PAD_MULTIPLE)
        for order in train_epoch_orders(lengths, batch_size, length_grouped, seed, epochs)
    ]
    mean = mean_tokens(per_epoch)
    spread = max(abs(e.padded_tokens / mean.padded_tokens - 1) for e in per_epoch)
    return mean, spread


def dev_tokens(lengths: Sequence[int], batch_size: int) -> EpochTokens:
    """clue_adv.data.eval_loader sorts dev examples by length (stable, ascending) before batching."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return batch_tokens(lengths, order, batch_size, PAD_MULTIPLE)


def tile_to(lengths: Sequence[int], size: int, seed: int = 0) -> list[int]:
    """`lengths` repeated whole as often as fits in `size`, topped up with a seeded random subset: a sample
    scaled to the official split size with its length distribution kept (a tiling varies less than a
    bootstrap)."""
    whole, rest = divmod(size, len(lengths))
    return list(lengths) * whole + random.Random(seed).sample(list(lengths), rest)


@dataclass(frozen=True)
class SplitSource:
    path: Path
    records: int
    scaled_to: int
    note: str


def _source(candidates: list[tuple[Path, str]]) -> tuple[Path, str]:
    for path, note in candidates:
        if path.is_file():
            return path, note
    raise SystemExit("no data found; tried " + ", ".join(str(p) for p, _ in candidates))


def split_sources(task: str, data_root: Path) -> dict[str, tuple[Path, str]]:
    """Which file gives each split's lengths, best first: the full split, else a stand-in of the same task."""
    root = data_root / task
    return {
        "train": _source(
            [
                (root / "train.json", "full train set"),
                (root / "dev.json", "dev set as a stand-in for train (train not available offline)"),
                (ASSETS / task / "train.json", "bundled sample (clue_adv/assets) as a stand-in"),
            ]
        ),
        "dev": _source(
            [
                (root / "dev.json", "full dev set"),
                (ASSETS / task / "dev.json", "bundled sample (clue_adv/assets) as a stand-in"),
            ]
        ),
    }


class TokenCounter:
    """Tokenizes each (file, max length) once and caches the batch statistics of each (task, batching)."""

    def __init__(self, data_root: Path, sim_epochs: int = 2) -> None:
        self.data_root = data_root
        self.sim_epochs = sim_epochs
        self._lengths: dict[tuple[str, str, int], tuple[list[int], SplitSource]] = {}
        self._train: dict[tuple[Any, ...], tuple[EpochTokens, float]] = {}

    def lengths(self, task: str, split: str, max_length: int) -> tuple[list[int], SplitSource]:
        key = (task, split, max_length)
        if key not in self._lengths:
            path, note = split_sources(task, self.data_root)[split]
            sentences = read_split(path, None)["sentence"]
            # Exactly what clue_adv.data.tokenize does: the sentence alone, truncated, specials included.
            ids = common.load_tokenizer()(sentences, truncation=True, max_length=max_length)["input_ids"]
            raw = [len(x) for x in ids]
            size = OFFICIAL_SIZES.get(task, {}).get(split, len(raw))
            scaled = raw if size == len(raw) else tile_to(raw, size)
            if size != len(raw):
                note += f", tiled from {len(raw):,} to the official {size:,} records"
            self._lengths[key] = (scaled, SplitSource(path, len(raw), size, note))
        return self._lengths[key]

    def train(self, task: str, max_length: int, batch_size: int, grouped: bool, seed: int) -> tuple[EpochTokens, float]:
        key = (task, max_length, batch_size, grouped, seed)
        if key not in self._train:
            lengths, _ = self.lengths(task, "train", max_length)
            self._train[key] = train_tokens(lengths, batch_size, grouped, seed, self.sim_epochs)
        return self._train[key]

    def dev(self, task: str, max_length: int, batch_size: int) -> EpochTokens:
        lengths, _ = self.lengths(task, "dev", max_length)
        return dev_tokens(lengths, batch_size)


# ------------------------------------------------------------------------------------------------------
# Cells and their cost


@dataclass(frozen=True)
class CellSpec:
    """The fields of one planned run that its cost depends on."""

    name: str
    task: str
    strategy: str  # the run directory's strategy tag (e.g. fgm-study)
    strategy_row: str  # the strategy benchmark's row label (e.g. gradient_penalty[exact])
    seed: int
    epochs: int
    batch_size: int
    max_length: int
    eval_batch_size: int
    grad_accum_steps: int
    length_grouped: bool
    head: str
    num_labels: int
    architecture: tuple[tuple[str, Any], ...]
    precision: str
    cost: StepCost


def protocol_fields(cfg: RunConfig) -> dict[str, Any]:
    """The CellSpec fields a training protocol sets (what `clue_protocol` swaps in from another config)."""
    return {
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
        "eval_batch_size": cfg.eval.batch_size,
        "grad_accum_steps": cfg.optim.grad_accum_steps,
        "length_grouped": cfg.data.length_grouped,
        "head": cfg.model.head,
    }


def cell_spec(cfg: RunConfig, name: str, strategy_tag: str) -> CellSpec:
    strategy = build_strategy(cfg.strategy)
    mode = getattr(cfg.strategy, "mode", None)
    return CellSpec(
        name=name,
        task=cfg.task,
        strategy=strategy_tag,
        strategy_row=f"{cfg.strategy.name}[{mode}]" if mode else cfg.strategy.name,
        seed=cfg.seed,
        **protocol_fields(cfg),
        num_labels=cfg.num_labels,
        architecture=tuple(sorted(cfg.model.architecture.overrides().items())),
        precision=cfg.precision,
        cost=strategy.cost(),
    )


def plan_cells(sweep: Path, overrides: list[str] | None = None) -> list[CellSpec]:
    """Every cell of the sweep, through clue_adv's planner. The plan is made against an empty output directory:
    the estimate is for the whole grid, whatever has already run here."""
    with tempfile.TemporaryDirectory(prefix="clue-adv-estimate-") as empty:
        plan = load_plan(sweep, output_dir=empty, overrides=overrides)
        return [cell_spec(c.config, c.name, c.directory.parent.name) for c in plan.cells]


def clue_protocol(cell: CellSpec, configs_dir: Path = REPO / "configs") -> CellSpec:
    """The same cell (task, strategy, seed) under configs/<task>/baseline.yaml's protocol: CLUE's 3 epochs,
    pooler head, and that file's batch size, max length, eval batch and batching."""
    return replace(cell, **protocol_fields(load_config(configs_dir / cell.task / "baseline.yaml")))


@dataclass(frozen=True)
class CellCost:
    """One run's FLOPs, split into training and evaluation."""

    steps_per_epoch: int
    train_flops_per_epoch: float
    eval_flops_per_epoch: float
    epochs: int
    multiplier: float
    padded_tokens_per_epoch: float
    padding_share: float
    sampling_spread: float

    @property
    def total_flops(self) -> float:
        return self.epochs * (self.train_flops_per_epoch + self.eval_flops_per_epoch)

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def cell_cost(
    cell: CellSpec,
    flops: ModelFlops,
    train: EpochTokens,
    dev: EpochTokens,
    double_backward_weight: float = 2.0,
    sampling_spread: float = 0.0,
) -> CellCost:
    multiplier = step_multiplier(cell.cost, double_backward_weight)
    per_pass = flops.train_flops(train.padded_tokens, train.padded_tokens_x_length, train.examples)
    return CellCost(
        steps_per_epoch=math.ceil(train.batches / cell.grad_accum_steps),
        train_flops_per_epoch=multiplier * per_pass,
        eval_flops_per_epoch=flops.forward_flops(dev.padded_tokens, dev.padded_tokens_x_length, dev.examples),
        epochs=cell.epochs,
        multiplier=multiplier,
        padded_tokens_per_epoch=train.padded_tokens,
        padding_share=train.padding_share,
        sampling_spread=sampling_spread,
    )


def seconds(total_flops: float, mfu: float, peak_tflops: float = H100_SXM_BF16_DENSE_TFLOPS) -> float:
    return total_flops / (peak_tflops * 1e12 * mfu)


class Estimator:
    """Costs cells, building each model shape's FLOP counts once."""

    def __init__(self, tokens: TokenCounter, double_backward_weight: float) -> None:
        self.tokens = tokens
        self.double_backward_weight = double_backward_weight
        self._models: dict[tuple[Any, ...], ModelFlops] = {}

    def model(self, cell: CellSpec) -> ModelFlops:
        key = (cell.architecture, cell.head, cell.num_labels)
        if key not in self._models:
            self._models[key] = model_flops(bert_config(dict(cell.architecture), cell.num_labels), cell.head)
        return self._models[key]

    def cost(self, cell: CellSpec, grouped: bool | None = None) -> CellCost:
        """`grouped`: the batching to cost (default: the cell's own `data.length_grouped`)."""
        grouped = cell.length_grouped if grouped is None else grouped
        train, spread = self.tokens.train(cell.task, cell.max_length, cell.batch_size, grouped, cell.seed)
        dev = self.tokens.dev(cell.task, cell.max_length, cell.eval_batch_size)
        return cell_cost(cell, self.model(cell), train, dev, self.double_backward_weight, spread)


# ------------------------------------------------------------------------------------------------------
# Early stopping: epochs to the best dev epoch, measured on the proxy study


@dataclass(frozen=True)
class ProxyRun:
    """One full dev curve replayed by scripts/early_stopping_fidelity.py."""

    run: str
    strategy: str  # the proxy run's strategy tag
    epochs: int
    best_epoch: int
    stops: dict[int, int]  # patience -> the epoch the replayed rule stopped at


def read_fidelity(path: Path) -> tuple[list[ProxyRun], list[dict[str, Any]]]:
    """The runs of scripts/early_stopping_fidelity.py's JSON and its per-patience rows (found, points lost);
    ValueError naming what is wrong."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read it ({exc.strerror or exc})") from exc
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from exc
    runs = data.get("runs") if isinstance(data, dict) else None
    if not isinstance(runs, list) or not runs:
        raise ValueError("no `runs` list (write it with scripts/early_stopping_fidelity.py --out)")
    out = []
    for i, r in enumerate(runs):
        fields = (r.get("strategy"), r.get("epochs"), r.get("best_epoch")) if isinstance(r, dict) else (None,) * 3
        if not (isinstance(fields[0], str) and all(isinstance(x, int) and x >= 1 for x in fields[1:])):
            raise ValueError(f"runs[{i}] lacks a strategy, or whole epochs and best_epoch >= 1")
        stops = {
            int(k.removeprefix("patience_")): v["stop_epoch"]
            for k, v in r.items()
            if k.startswith("patience_") and isinstance(v, dict) and isinstance(v.get("stop_epoch"), int)
        }
        out.append(ProxyRun(str(r.get("run", f"runs[{i}]")), fields[0], fields[1], fields[2], stops))
    rows = data.get("patience")
    return out, [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def proxy_runs_for(tag: str, runs: list[ProxyRun]) -> tuple[str, str, list[ProxyRun]]:
    """(proxy tag, how matched, runs) for a reproduction strategy tag. Best first: runs with the proxy tag itself
    ("exact"); else its strength variants, `<proxy tag>-<field>=<value>` as the selection sweep names them
    ("variants": the same strategy at other strengths); else every run ("all runs": nothing measured for it)."""
    proxy = PROXY_TAGS.get(tag, tag)
    exact = [r for r in runs if r.strategy == proxy]
    if exact:
        return proxy, "exact", exact
    variants = [r for r in runs if r.strategy.startswith(proxy + "-") and "=" in r.strategy[len(proxy) + 1 :]]
    if variants:
        return proxy, "variants", variants
    return proxy, "all runs", list(runs)


def epochs_to_best(runs: list[ProxyRun]) -> int:
    """The median best epoch, rounded up (a run trains whole epochs; up, so a median between two counts the later)."""
    return math.ceil(statistics.median(r.best_epoch for r in runs))


def stopped_epochs(budget: int, to_best: int, patience: int) -> int:
    """Epochs a run trains under early stopping when it improves last at epoch `to_best`: the rule stops `patience`
    evaluations (one per epoch) later, unless the epoch budget ends it first."""
    return min(budget, to_best + patience)


def early_stopping_strategies(cells: list[CellSpec], runs: list[ProxyRun], patiences: list[int]) -> dict[str, Any]:
    """Per reproduction strategy: the proxy runs it is matched to, their best epochs and replayed stop epochs, and
    the epochs each patience gives its cells."""
    out: dict[str, Any] = {}
    for cell in cells:
        if cell.strategy in out:
            continue
        proxy, how, matched = proxy_runs_for(cell.strategy, runs)
        to_best = epochs_to_best(matched)
        out[cell.strategy] = {
            "proxy_tag": proxy,
            "matched": how,
            "fallback": how == "all runs",
            "proxy_runs": [r.run for r in matched],
            "proxy_strategies": sorted({r.strategy for r in matched}),
            "proxy_epochs": sorted({r.epochs for r in matched}),
            "best_epochs": [r.best_epoch for r in matched],
            "median_best_epoch": statistics.median(r.best_epoch for r in matched),
            "max_best_epoch": max(r.best_epoch for r in matched),
            "epochs_to_best": to_best,
            "replayed_stop_epochs": {str(p): [r.stops[p] for r in matched if p in r.stops] for p in patiences},
            "epochs": {str(p): stopped_epochs(cell.epochs, to_best, p) for p in patiences},
        }
    return out


def early_stopping_cells(cells: list[CellSpec], strategies: dict[str, Any], patience: int) -> list[CellSpec]:
    """The cells with the epochs they train under early stopping with this patience."""
    return [
        replace(c, epochs=stopped_epochs(c.epochs, strategies[c.strategy]["epochs_to_best"], patience)) for c in cells
    ]


# ------------------------------------------------------------------------------------------------------
# The report


def _measured_cpu_ratios() -> dict[str, float]:
    """Step-time ratios measured by scripts/bench_strategies.py on CPU (tiny model): a cross-check only."""
    try:
        data = json.loads(CPU_STRATEGY_BENCH.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {k: v.get("training_step_ratio_to_none") for k, v in data.get("strategies", {}).items()}


def _scenario(estimator: Estimator, cells: list[CellSpec], grouped: bool | None) -> list[tuple[CellSpec, CellCost]]:
    return [(c, estimator.cost(c, grouped)) for c in cells]


def _total_flops(rows: list[tuple[CellSpec, CellCost]]) -> float:
    return sum(cost.total_flops for _, cost in rows)


def _hours(flops: float, mfu: float, peak: float) -> float:
    return seconds(flops, mfu, peak) / 3600


def _batching_of(cells: list[CellSpec]) -> str:
    """How the cells' own configs batch: `random`, `length_grouped`, or `mixed`."""
    grouped = {c.length_grouped for c in cells}
    return "mixed" if len(grouped) > 1 else "length_grouped" if grouped.pop() else "random"


def _needed(rows: list[tuple[CellSpec, CellCost]], mfu: float, peak: float, target_s: float) -> dict[str, Any]:
    """What would bring these runs under `target_s` on one GPU. Every cost here is per epoch, so the time is
    linear in epochs and in 1/MFU."""
    total = seconds(_total_flops(rows), mfu, peak)
    epochs = sorted({c.epochs for c, _ in rows})
    per_epoch = total / epochs[0] if len(epochs) == 1 else None
    return {
        "seconds": total,
        "epochs_for_target": target_s / per_epoch if per_epoch else None,
        "mfu_for_target": mfu * total / target_s,
        "gpus_for_target": math.ceil(total / target_s),
    }


def build_payload(args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
    cells = plan_cells(args.sweep, args.set)
    tokens = TokenCounter(args.data_root, args.sim_epochs)
    estimator = Estimator(tokens, args.double_backward_weight)
    mfus = sorted(set(MFU_TABLE) | {args.mfu})
    target_s = args.target_minutes * 60
    protocols = {"as_shipped": cells, "clue": [clue_protocol(c) for c in cells]}

    def summary(protocol: str, batching: str, specs: list[CellSpec], grouped: bool | None) -> dict[str, Any]:
        rows = _scenario(estimator, specs, grouped)
        rows_by[protocol, batching] = rows
        flops = _total_flops(rows)
        return {
            "protocol": protocol,
            "batching": batching,
            "configured_batching": _batching_of(specs),
            "runs": len(rows),
            "epochs": sorted({c.epochs for c, _ in rows}),
            "total_pflop": flops / 1e15,
            "train_share": sum(k.epochs * k.train_flops_per_epoch for _, k in rows) / flops,
            "optimizer_steps": sum(k.steps for _, k in rows),
            "gpu_hours": {str(m): _hours(flops, m, args.peak_tflops) for m in mfus},
            "to_reach_target": {str(m): _needed(rows, m, args.peak_tflops, target_s) for m in mfus},
        }

    scenarios: dict[str, dict[str, Any]] = {}
    rows_by: dict[tuple[str, str], list[tuple[CellSpec, CellCost]]] = {}
    for protocol, specs in protocols.items():
        for batching, grouped in (("configured", None), ("random", False), ("length_grouped", True)):
            scenarios[f"{protocol}/{batching}"] = summary(protocol, batching, specs, grouped)

    early_stopping = None
    if args.early_stopping is not None:
        proxy = args.proxy_runs  # read and checked by parse_args
        per_strategy = early_stopping_strategies(cells, proxy, args.patience)
        fidelity = {r.get("patience"): r for r in args.fidelity_rows}
        early_stopping = {
            "file": _rel(str(args.early_stopping)),
            "proxy_runs": len(proxy),
            "proxy_epochs": sorted({r.epochs for r in proxy}),
            "proxy_tags": dict(PROXY_TAGS),
            "rule": "each cell trains min(its epochs, epochs_to_best + patience); epochs_to_best = the median best "
            "dev epoch of the proxy runs of its strategy, rounded up",
            "strategies": per_strategy,
            "scenarios": {
                str(p): {
                    "patience": p,
                    **summary(f"early_stopping/{p}", "configured", early_stopping_cells(cells, per_strategy, p), None),
                    "proxy_fidelity": fidelity.get(p),  # found / points lost on the proxy, where it was replayed
                }
                for p in args.patience
            },
        }

    cell_rows = []
    for protocol in protocols:
        for spec, cost in rows_by[protocol, "configured"]:
            cell_rows.append(
                {
                    "protocol": protocol,
                    **{k: v for k, v in asdict(spec).items() if k not in ("cost", "architecture")},
                    "declared_cost": asdict(spec.cost),
                    "step_multiplier": cost.multiplier,
                    "steps_per_epoch": cost.steps_per_epoch,
                    "padded_tokens_per_epoch": cost.padded_tokens_per_epoch,
                    "padding_share": cost.padding_share,
                    "sampling_spread": cost.sampling_spread,
                    "train_pflop_per_epoch": cost.train_flops_per_epoch / 1e15,
                    "eval_pflop_per_epoch": cost.eval_flops_per_epoch / 1e15,
                    "total_pflop": cost.total_flops / 1e15,
                    "gpu_minutes": seconds(cost.total_flops, args.mfu, args.peak_tflops) / 60,
                    # Training only (evaluation excluded), to compare with a measured step time.
                    "ms_per_step": 1000
                    * seconds(cost.train_flops_per_epoch, args.mfu, args.peak_tflops)
                    / cost.steps_per_epoch,
                }
            )

    data = {}
    for task in sorted({c.task for c in cells}):
        max_length = next(c.max_length for c in cells if c.task == task)
        batch = next(c.batch_size for c in cells if c.task == task)
        eval_batch = next(c.eval_batch_size for c in cells if c.task == task)
        seed = next(c.seed for c in cells if c.task == task)
        entry: dict[str, Any] = {"max_length": max_length, "batch_size": batch, "seed": seed}
        for split in ("train", "dev"):
            lengths, source = tokens.lengths(task, split, max_length)
            entry[split] = {
                "file": _rel(str(source.path)),  # relative to the repository
                "records_read": source.records,
                "records_counted": source.scaled_to,
                "source": source.note,
                "mean_tokens": sum(lengths) / len(lengths),
                "truncated_share": sum(n >= max_length for n in lengths) / len(lengths),
            }
        for name, grouped in (("random", False), ("length_grouped", True)):
            epoch, spread = tokens.train(task, max_length, batch, grouped, seed)
            entry["train"][f"per_epoch_{name}"] = {**asdict(epoch), "padding_share": epoch.padding_share}
            entry["train"][f"per_epoch_{name}"]["epoch_to_epoch_spread"] = spread
        dev = tokens.dev(task, max_length, eval_batch)
        entry["dev"]["per_pass"] = {**asdict(dev), "padding_share": dev.padding_share, "batch_size": eval_batch}
        data[task] = entry

    measured = _measured_cpu_ratios()
    strategies = {}
    for c in cells:
        strategies.setdefault(
            c.strategy,
            {
                "row": c.strategy_row,
                "declared_cost": asdict(c.cost),
                "step_multiplier": step_multiplier(c.cost, args.double_backward_weight),
                "analytic_step_multiplier": analytic_step_multiplier(c.cost),
                "cpu_measured_training_step_ratio": measured.get(c.strategy_row),
            },
        )
    model = estimator.model(cells[0])
    return {
        "machine": info,
        "note": "An estimate from counted tokens and assumed throughput; nothing here was measured on a GPU.",
        "assumptions": {
            "gpu": "One H100 SXM, runs back to back with no idle time (or packed concurrently at the same MFU)",
            "peak_tflops": args.peak_tflops,
            "peak_tflops_source": "NVIDIA H100 SXM datasheet: bf16 1979 TFLOP/s with sparsity, 989 dense",
            "mfu": args.mfu,
            "mfu_table": list(mfus),
            "precision": "bf16 autocast (clue_adv's precision: auto on a bf16-capable GPU)",
            "pad_to_multiple_of": PAD_MULTIPLE,
            "double_backward_weight": args.double_backward_weight,
            "flops_formula": "6·N_token·T + 12·L·d·Σ(B·s²) + 6·N_seq·examples; forward = 1/3 of that",
            "excluded": "start-up, tokenization, data loading, per-step fixed costs (launches, optimizer, sync)",
            "target_minutes": args.target_minutes,
            "sim_epochs": args.sim_epochs,
        },
        "sweep": _rel(str(args.sweep)),
        "sweep_base": load_sweep(args.sweep).base,
        "overrides": args.set or [],
        "model": {**asdict(model), "head": cells[0].head, "num_labels_of_first_cell": cells[0].num_labels},
        "data": data,
        "strategies": strategies,
        "scenarios": scenarios,
        "cells": cell_rows,
        "fp32_cells": [c.name for c in cells if c.precision == "fp32"],
        "max_epoch_spread": max(r["sampling_spread"] for r in cell_rows),
        **({"early_stopping": early_stopping} if early_stopping is not None else {}),
    }


def _f(x: float | None, digits: int = 2) -> str:
    return common.fmt(x, digits)


def markdown(p: dict[str, Any]) -> str:
    a = p["assumptions"]
    mfu, mfus, target = a["mfu"], a["mfu_table"], a["target_minutes"]
    sc = p["scenarios"]
    shipped, clue = sc["as_shipped/configured"], sc["clue/configured"]
    key = str(mfu)
    out = [
        f"# Estimated H100 time of `{Path(p['sweep']).name}` ({shipped['runs']} runs)",
        "",
        "**An estimate, not a measurement**: no GPU was used. Tokens and FLOPs are counted from the real data and",
        "the project's own batching; the throughput is an assumption (H100 SXM bf16 dense peak "
        f"{a['peak_tflops']:g} TFLOP/s × MFU {mfu:g}).",
        "",
        "## Headline",
        "",
        f"- **As shipped** (the sweep's own settings, base `{p['sweep_base']}`: "
        f"{'/'.join(map(str, shipped['epochs']))} epochs, {shipped['configured_batching']} batches): "
        f"**{shipped['gpu_hours'][key]:.1f} GPU-hours** at MFU {mfu:g} "
        + "("
        + ", ".join(f"{shipped['gpu_hours'][str(m)]:.1f} h at {m:g}" for m in mfus if m != mfu)
        + f"). Target: {target:g} min.",
        f"- The same grid under the **CLUE protocol** ({'/'.join(map(str, clue['epochs']))} epochs, "
        f"configs/*/baseline.yaml): **{clue['gpu_hours'][key] * 60:.0f} GPU-minutes** at MFU {mfu:g} "
        + "("
        + ", ".join(f"{clue['gpu_hours'][str(m)] * 60:.0f} min at {m:g}" for m in mfus if m != mfu)
        + ").",
    ]
    need = shipped["to_reach_target"][key]
    if need["seconds"] > target * 60:
        parts = []
        if need["epochs_for_target"] is not None:
            parts.append(f"at most **{need['epochs_for_target']:.1f} epochs** per run")
        parts.append(
            f"an MFU of **{need['mfu_for_target']:.2f}**"
            + (" (impossible: above 1)" if need["mfu_for_target"] > 1 else "")
            + f" at {'/'.join(map(str, shipped['epochs']))} epochs"
        )
        parts.append(f"**{need['gpus_for_target']} H100s** in parallel")
        out.append(
            f"- Under {target:g} min on one H100 as shipped would need " + ", or ".join(parts) + f" (MFU {mfu:g})."
        )
    else:
        out.append(f"- As shipped, the grid fits in {target:g} min at MFU {mfu:g}.")
    out += _early_stopping_headline(p)
    out += [
        "",
        "## Totals (GPU-hours on one H100, runs back to back)",
        "",
        "| protocol | batching | epochs | runs | PFLOP | train share | "
        + " | ".join(f"MFU {m:g}" for m in mfus)
        + f" | epochs for {target:g} min (MFU {mfu:g}) | MFU for {target:g} min | H100s for {target:g} min |",
        "|---|---|---|---|---|---|" + "---|" * len(mfus) + "---|---|---|",
    ]
    for s in sc.values():
        if s["batching"] == "configured":
            continue  # the same numbers as one of the explicit rows; the headline names which
        n = s["to_reach_target"][key]
        shipped_mark = " (as configured)" if s["batching"] == s["configured_batching"] else ""
        out.append(
            f"| {'as shipped' if s['protocol'] == 'as_shipped' else 'clue'} | {s['batching']}{shipped_mark} "
            f"| {'/'.join(map(str, s['epochs']))} | {s['runs']} | {s['total_pflop']:,.0f} | {s['train_share']:.1%} | "
            + " | ".join(f"{s['gpu_hours'][str(m)]:.2f}" for m in mfus)
            + f" | {_f(n['epochs_for_target'], 1)} | {n['mfu_for_target']:.2f} | {n['gpus_for_target']} |"
        )
    for s in (p.get("early_stopping") or {}).get("scenarios", {}).values():
        n = s["to_reach_target"][key]
        out.append(
            f"| as shipped + early stopping, patience {s['patience']} | {s['configured_batching']} (as configured) "
            f"| {'/'.join(map(str, s['epochs']))} | {s['runs']} | {s['total_pflop']:,.0f} | {s['train_share']:.1%} | "
            + " | ".join(f"{s['gpu_hours'][str(m)]:.2f}" for m in mfus)
            + f" | {_f(n['epochs_for_target'], 1)} | {n['mfu_for_target']:.2f} | {n['gpus_for_target']} |"
        )
    steps = shipped["optimizer_steps"]
    out += [
        "",
        f"Fixed per-step costs are not in these FLOPs. As shipped the grid takes {steps:,} optimizer steps: every "
        f"millisecond of per-step overhead (kernel launches, optimizer, the loss sync) adds {steps / 1000 / 60:.0f} "
        f"min; the CLUE protocol takes {clue['optimizer_steps']:,} steps ({clue['optimizer_steps'] / 1000 / 60:.1f} "
        "min per ms).",
        "",
        f"## Per run (as shipped, MFU {mfu:g}; seeds differ only in batch order)",
        "",
        "| task | strategy | epochs | steps/epoch | padded tokens/epoch (padding) | step × | train PFLOP/epoch "
        "| dev PFLOP/epoch | PFLOP/run | min/run | runs | GPU-h | implied ms per training step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in p["cells"]:
        if row["protocol"] == "as_shipped":
            groups[row["task"], row["strategy"]].append(row)
    for (task, strategy), rows in groups.items():
        mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0] if isinstance(rows[0][k], float)}
        total_min = sum(r["gpu_minutes"] for r in rows)
        out.append(
            f"| {task} | {strategy} | {rows[0]['epochs']} | {rows[0]['steps_per_epoch']:,} "
            f"| {mean['padded_tokens_per_epoch'] / 1e6:.2f} M ({mean['padding_share']:.0%}) "
            f"| {rows[0]['step_multiplier']:.2f} | {mean['train_pflop_per_epoch']:.1f} "
            f"| {mean['eval_pflop_per_epoch']:.2f} "
            f"| {mean['total_pflop']:,.0f} | {mean['gpu_minutes']:.1f} | {len(rows)} | {total_min / 60:.2f} "
            f"| {mean['ms_per_step']:.1f} |"
        )
    out += [
        "",
        "## Strategies (passes from each strategy's own `cost()`)",
        "",
        "| strategy | forward / backward / double backward | step × plain (FLOPs) | CPU-measured training_step × "
        "(tiny model) | note |",
        "|---|---|---|---|---|",
    ]
    for tag, s in p["strategies"].items():
        d = s["declared_cost"]
        label = tag if tag == s["row"] else f"{tag} ({s['row']})"
        out.append(
            f"| {label} | {d['forward']} / {d['backward']} / {'yes' if d['double_backward'] else 'no'}"
            f"{_batch_note(d)} "
            f"| {s['step_multiplier']:.2f} | {_f(s['cpu_measured_training_step_ratio'])} | {d['note'] or ''} |"
        )
    m = p["model"]
    out += [
        "",
        f"A forward = 1 unit, a backward = 2, a double backward = {a['double_backward_weight']:g} backwards; "
        "plain fine-tuning = 3 units. The last column is `results/bench/strategies-cpu.json` "
        "(2-layer model on CPU), given as a cross-check of the pass arithmetic, not of H100 speed.",
        "",
        "## Data (tokenized with the bundled bert-base-chinese tokenizer)",
        "",
        "| task | split | source | records counted | mean tokens | cut at max length | padded tokens/pass "
        "random (padding) | length-grouped (padding) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for task, d in p["data"].items():
        t, v = d["train"], d["dev"]
        r, g = t["per_epoch_random"], t["per_epoch_length_grouped"]
        out.append(
            f"| {task} | train | {t['source']} (`{t['file']}`) | {t['records_counted']:,} "
            f"| {t['mean_tokens']:.1f} | {t['truncated_share']:.0%} "
            f"| {r['padded_tokens'] / 1e6:.2f} M ({r['padding_share']:.0%}) "
            f"| {g['padded_tokens'] / 1e6:.2f} M ({g['padding_share']:.0%}) |"
        )
        dp = v["per_pass"]
        out.append(
            f"| {task} | dev | {v['source']} (`{v['file']}`) | {v['records_counted']:,} | {v['mean_tokens']:.1f} "
            f"| {v['truncated_share']:.0%} | sorted, batch {dp['batch_size']}: {dp['padded_tokens'] / 1e6:.2f} M "
            f"({dp['padding_share']:.0%}) | – |"
        )
    out += [
        "",
        f"Batches: max length {next(iter(p['data'].values()))['max_length']}, padded to a multiple of "
        f"{a['pad_to_multiple_of']} (clue_adv on CUDA); train orders from clue_adv's own samplers on seed "
        f"{next(iter(p['data'].values()))['seed']}, "
        f"mean of the first {a['sim_epochs']} epochs (per-cell numbers use each cell's seed; one epoch's padded "
        f"tokens differ from that mean by at most {p['max_epoch_spread']:.1%}).",
        "",
        f"Model: {m['layers']} layers × {m['hidden']} (bundled config.json), N = {m['token_params']:,} "
        f"non-embedding parameters per token, {m['sequence_params']:,} per sequence (head `{m['head']}`, "
        f"{m['num_labels_of_first_cell']} labels in the first cell). FLOPs per train pass: {a['flops_formula']}.",
    ]
    out += _early_stopping_section(p)
    out += [
        "",
        "## Assumptions and caveats",
        "",
        f"- Throughput: {a['peak_tflops_source']}; MFU {mfu:g} is an assumption. Nothing here ran on a GPU.",
        f"- {a['gpu']}. Excluded: {a['excluded']}.",
        *_caveats(p),
        "",
        "## Machine (where this estimate was computed; no GPU)",
        "",
        *common.machine_markdown(p["machine"]),
        "",
    ]
    return "\n".join(out)


def _values(xs: list[int]) -> str:
    """A few values listed, many summarised."""
    if not xs:
        return "–"
    return ", ".join(map(str, sorted(xs))) if len(xs) <= 6 else f"median {statistics.median(xs):g}, max {max(xs)}"


def _early_stopping_headline(p: dict[str, Any]) -> list[str]:
    es = p.get("early_stopping")
    if not es:
        return []
    mfu = p["assumptions"]["mfu"]
    shipped = p["scenarios"]["as_shipped/configured"]["gpu_hours"][str(mfu)]
    parts, fidelity = [], []
    for s in es["scenarios"].values():
        hours = s["gpu_hours"][str(mfu)]
        parts.append(f"patience {s['patience']}: **{hours:.1f} GPU-hours** ({1 - hours / shipped:.0%} less)")
        f = s["proxy_fidelity"]
        if f and f.get("runs"):
            fidelity.append(
                f"patience {s['patience']} kept the full run's best epoch in {f['found']} of {f['runs']} "
                f"(mean {f['mean_lost_points']:.2f}, max {f['max_lost_points']:.2f} points lost)"
            )
    line = (
        f"- With **early stopping** (each cell trains its strategy's epochs to the best dev epoch, measured on "
        f"{es['proxy_runs']} proxy runs of the tiny model ({'/'.join(map(str, es['proxy_epochs']))} epochs, TNEWS; "
        f"not BERT-base), plus the patience): " + ", ".join(parts) + f" at MFU {mfu:g}."
    )
    if fidelity:
        line += " On those proxy runs " + "; ".join(fidelity) + "."
    return [line]


def _early_stopping_section(p: dict[str, Any]) -> list[str]:
    """Where the early-stopping scenarios' epochs come from, per strategy, and what limits them."""
    es = p.get("early_stopping")
    if not es:
        return []
    patiences = [s["patience"] for s in es["scenarios"].values()]
    mapping = ", ".join(f"{k} → {v}" for k, v in es["proxy_tags"].items())
    out = [
        "",
        "## Early stopping: epochs to the best dev epoch, measured on the proxy study",
        "",
        f"From `{es['file']}` (scripts/early_stopping_fidelity.py): {es['proxy_runs']} full dev curves of the proxy "
        f"study (the tiny model on full TNEWS, {'/'.join(map(str, es['proxy_epochs']))} epochs), **not BERT-base**; "
        "that file is refreshed as the proxy sweep completes, and this estimate with it (same command). Rule: "
        f"{es['rule']}. Strategies map to the proxy's tags as {mapping} (another tag is looked up as itself); a "
        "strategy without proxy runs of that tag takes its strength variants (`<tag>-<field>=<value>`, the "
        "selection sweep's), else the median of all runs, **flagged** below.",
        "",
        "| strategy | proxy runs used | best epochs | median → epochs to best | max | "
        + " | ".join(f"patience {q}: epochs trained (proxy's replayed stops)" for q in patiences)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(patiences),
    ]
    for tag, s in es["strategies"].items():
        used = f"{len(s['proxy_runs'])} × {', '.join(s['proxy_strategies'])}"
        if s["fallback"]:
            used = f"**fallback: all {len(s['proxy_runs'])} runs** (none tagged {s['proxy_tag']})"
        elif s["matched"] == "variants":
            used += f" (strength variants of {s['proxy_tag']})"
        out.append(
            f"| {tag} | {used} | {_values(s['best_epochs'])} | {s['median_best_epoch']:g} → {s['epochs_to_best']} "
            f"| {s['max_best_epoch']} | "
            + " | ".join(f"{s['epochs'][str(q)]} ({_values(s['replayed_stop_epochs'][str(q)])})" for q in patiences)
            + " |"
        )
    out += [
        "",
        "- Transferred, not measured: that the estimated runs (this sweep's model and protocol) reach their best dev "
        "epoch after as many epochs as the proxy's tiny model does, on every task as on TNEWS. The max column is "
        "the slow end seen on the proxy.",
        "- Only runs that trained every epoch are replayed: proxy runs ended by their own early stopping are not in "
        "the file. A proxy run whose replayed stop is its last epoch saved nothing there, and might have improved "
        "after it: its best epoch is then a lower bound.",
    ]
    return out


def _caveats(p: dict[str, Any]) -> list[str]:
    """The caveats that depend on this run's numbers, computed rather than written in."""
    a, lines = p["assumptions"], []
    per_step = {
        task: d["train"]["per_epoch_random"]["padded_tokens"] / d["train"]["per_epoch_random"]["batches"]
        for task, d in p["data"].items()
    }
    task = min(per_step, key=per_step.__getitem__)
    lines += [
        f"- Small batches ({task}: {p['data'][task]['batch_size']} examples of ≈ "
        f"{p['data'][task]['train']['mean_tokens']:.0f} tokens, ≈ {per_step[task]:,.0f} padded positions per step)",
        "  are too little work to keep an H100 busy from one eager PyTorch process: kernel launches and the",
        "  per-step sync, not FLOPs, would set the step time (see the implied ms per training step and the",
        "  per-ms overhead line). An MFU like 0.35 is plausible only with several runs sharing the GPU (concurrent",
        "  processes, MPS) or CUDA graphs; one run after another, expect the time to be longer than the table's.",
    ]
    for task, d in p["data"].items():
        if "stand-in" in d["train"]["source"]:
            lines.append(
                f"- {task}: {d['train']['source']}; {d['train']['truncated_share']:.0%} of its texts reach the "
                f"{d['max_length']}-token cap, so the stand-in's padding should be close to the real train set's."
            )
    double = {tag: s for tag, s in p["strategies"].items() if s["declared_cost"]["double_backward"]}
    if double:
        lines += [
            f"- {', '.join(double)}: a double backward needs eager attention (fused SDPA has none), slower per",
            f"  FLOP than SDPA. Counting it as {a['double_backward_weight']:g} backwards is a convention: if each",
            "  create_graph backward computes input gradients only (autograd.grad does), the analytic count is "
            + ", ".join(f"{s['analytic_step_multiplier']:.2f}× ({tag})" for tag, s in double.items()),
            "  instead of " + ", ".join(f"{s['step_multiplier']:.2f}×" for s in double.values()) + ".",
        ]
    if p["fp32_cells"]:
        lines.append(f"- fp32 cells (the bf16 peak does not apply to them): {', '.join(p['fp32_cells'])}")
    return lines


def _rel(path: str) -> str:
    return os.path.relpath(Path(path).resolve(), REPO)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", type=Path, default=DEFAULT_SWEEP, help="sweep file (default: sweeps/reproduce.yaml)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, as `clue-adv sweep`")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="CLUE JSON-lines files, one dir per task")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help="assumed model-FLOPs utilization (0-1]")
    p.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS, help="GPU peak, TFLOP/s")
    p.add_argument("--double-backward-weight", type=float, default=2.0, help="a double backward = this × backward")
    p.add_argument("--target-minutes", type=float, default=TARGET_MINUTES)
    p.add_argument("--sim-epochs", type=int, default=2, help="epochs of batch orders simulated per (task, seed)")
    p.add_argument("--output-dir", type=Path, default=common.RESULTS)
    p.add_argument(
        "--early-stopping",
        type=Path,
        metavar="FIDELITY_JSON",
        help="add early-stopping scenarios, epochs to the best dev epoch from this scripts/early_stopping_fidelity.py "
        "output (e.g. results/proxy-tnews/early-stopping.json)",
    )
    p.add_argument(
        "--patience",
        type=int,
        nargs="+",
        default=list(DEFAULT_PATIENCE),
        help="with --early-stopping: the patiences to cost (default: 3 5)",
    )
    args = p.parse_args(argv)
    if not 0 < args.mfu <= 1:
        p.error("--mfu must be in (0, 1]")
    if args.peak_tflops <= 0 or args.double_backward_weight < 1 or args.sim_epochs < 1:
        p.error("--peak-tflops must be > 0, --double-backward-weight >= 1, --sim-epochs >= 1")
    if any(x < 1 for x in args.patience):
        p.error("--patience values must be >= 1")
    args.patience = sorted(set(args.patience))
    args.proxy_runs, args.fidelity_rows = [], []
    if args.early_stopping is not None:
        try:
            args.proxy_runs, args.fidelity_rows = read_fidelity(args.early_stopping)
        except ValueError as exc:
            p.error(f"--early-stopping {args.early_stopping}: {exc}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = common.machine_info(torch.device("cpu"), common.command_line(__file__, argv))
    payload = build_payload(args, info)
    common.finish_info(info)
    text = markdown(payload)
    json_path, md_path = common.write_outputs(STEM, payload, text, args.output_dir)
    print(text)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
