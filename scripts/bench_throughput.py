"""Baseline fine-tuning throughput: clue_adv's loop vs Hugging Face `Trainer` vs a plain pad-to-128 loop.

Every contender trains the same random-init model shape for one epoch on the same examples with the
same batch size, max length and precision (and plain fine-tuning, no regularizer), and all are timed
the same way: wall time of the epoch's training loop (data loading included, setup and evaluation
excluded), synchronised on a GPU. Rounds run every contender once in a shuffled order, so a busy spell
on the shared machine hits all of them; the report gives medians and ratios.

Contenders:
  clue_adv          clue_adv.train.train with data.length_grouped=true (dynamic padding, length-grouped batches)
  clue_adv_random   the same with length_grouped=false (the default: dynamic padding, random batches)
  trainer           transformers.Trainer with its defaults (dynamic padding via DataCollatorWithPadding,
                    random batches, its default optimizer: fused AdamW)
  trainer_grouped   the same with train_sampling_strategy="group_by_length"
  pad128            a plain PyTorch loop on inputs padded to max length 128 (what the CLUE baselines do), with
                    clue_adv's optimizer, so that its ratio to clue_adv measures padding alone

The Trainer contenders need accelerate, which clue_adv itself does not: `pip install -e '.[bench]'` (`dev`
includes it).

Every contender trains on one GPU: run as a script, it makes only the first of CUDA_VISIBLE_DEVICES visible (on a
host with several, transformers.Trainer would otherwise spread its batches over all of them through DataParallel).

The targets compare length-grouped clue_adv with Trainer's defaults (random batches) and with pad128; the
like-with-like pairs (random vs random, grouped vs grouped) are reported beside them.

Dev evaluation (no gradients, batch 128) is timed for clue_adv.evaluate, Trainer.evaluate and a
pad-to-128 loop.

    python scripts/bench_throughput.py                       # TNEWS and IFLYTEK, tiny BERT on CPU
    python scripts/bench_throughput.py --tasks tnews --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def first_gpu_only(visible: str | None) -> str:
    """The CUDA_VISIBLE_DEVICES that leaves only the first of `visible` (device 0 when unset; none stays none)."""
    return "0" if visible is None else visible.split(",")[0].strip()


if __name__ == "__main__":
    # One GPU, as clue_adv trains on: transformers.Trainer would wrap the model in DataParallel over every visible
    # GPU and multiply its batch by their number. Set before anything initialises CUDA, which reads it once.
    os.environ["CUDA_VISIBLE_DEVICES"] = first_gpu_only(os.environ.get("CUDA_VISIBLE_DEVICES"))

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_common as common  # noqa: E402
import torch  # noqa: E402

from clue_adv.config import RunConfig  # noqa: E402
from clue_adv.data import TaskData, eval_loader, load_task_data  # noqa: E402
from clue_adv.evaluate import evaluate  # noqa: E402
from clue_adv.model import build_model  # noqa: E402
from clue_adv.train import (  # noqa: E402
    autocast_for,
    build_optimizer,
    configure_environment,
    pad_multiple_for,
    train,
)

# Epoch sizes that keep a full run (5 rounds, both tasks) to about 3 minutes on 2 busy cores.
DEFAULT_TRAIN_EXAMPLES = {"tnews": 1280, "iflytek": 320}
TARGETS = {"trainer": 1.5, "pad128": 3.0}  # clue_adv's samples/s must be at least this multiple (TNEWS)
# Like-with-like pairs, reported beside the targets (which pit length-grouped clue_adv against random batches).
COMPARISONS = {
    "clue_adv_random_over_trainer": ("clue_adv_random", "trainer", "random batches on both sides"),
    "clue_adv_over_trainer_grouped": ("clue_adv", "trainer_grouped", "length-grouped batches on both sides"),
}
TRAIN_CONTENDERS = (
    "clue_adv",
    "clue_adv_random",
    "trainer",
    "trainer_grouped",
    "pad128",
)
DESCRIPTIONS = {
    "clue_adv": "clue_adv.train.train, data.length_grouped=true (dynamic padding; to a multiple of 8 on CUDA only)",
    "clue_adv_random": "clue_adv.train.train, data.length_grouped=false (the default)",
    "trainer": "transformers.Trainer, defaults (random batches, dynamic padding, optim adamw_torch_fused)",
    "trainer_grouped": 'transformers.Trainer, train_sampling_strategy="group_by_length"',
    "pad128": "plain PyTorch loop, every batch padded to max length, clue_adv's optimizer (AdamW, fused on cpu/cuda)",
}
EVAL_DESCRIPTIONS = {
    "clue_adv": "clue_adv.evaluate on clue_adv.data.eval_loader (batches sorted by length, dynamic padding)",
    "trainer": "transformers.Trainer.evaluate (dev order, dynamic padding)",
    "pad128": "plain no-grad loop on inputs padded to max length",
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Bench:
    """Everything the contenders share for one task."""

    cfg: RunConfig
    tokenizer: Any
    data: TaskData
    device: torch.device
    workdir: Path
    train_sps: dict[str, list[float]] = field(default_factory=dict)
    eval_sps: dict[str, list[float]] = field(default_factory=dict)
    padded_tokens: dict[str, int] = field(default_factory=dict)

    @property
    def examples(self) -> int:
        return len(self.data.train)

    def fresh_model(self) -> torch.nn.Module:
        from transformers import set_seed

        set_seed(self.cfg.seed)
        return build_model(self.cfg, self.data.labels, False).to(self.device)


# ------------------------------------------------------------------------------------------------------
# Training contenders: each returns samples/s over one epoch


def train_clue_adv(bench: Bench, length_grouped: bool) -> float:
    from rich.console import Console

    cfg = bench.cfg.model_copy(deep=True)
    cfg.data.length_grouped = length_grouped
    # One directory per variant: a run directory refuses a different config.
    directory = bench.workdir / ("runs-grouped" if length_grouped else "runs-random")
    quiet = Console(file=io.StringIO())
    outcome = train(cfg, directory, force=True, show_progress=False, console=quiet)
    return float(outcome.summary["samples_per_s"])


def _training_args(bench: Bench, **extra: Any) -> Any:
    from transformers import TrainingArguments

    cfg, cuda = bench.cfg, bench.device.type == "cuda"
    args = TrainingArguments(
        output_dir=str(bench.workdir / "trainer"),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval.batch_size,
        num_train_epochs=1,
        learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay,
        warmup_steps=cfg.optim.warmup_ratio,  # transformers 5: a float below 1 is a ratio
        max_grad_norm=cfg.optim.max_grad_norm or 0.0,
        lr_scheduler_type="linear",
        seed=cfg.seed,
        bf16=cuda,
        use_cpu=not cuda,
        dataloader_pin_memory=cuda,
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="no",
        report_to="none",
        disable_tqdm=True,
        **extra,
    )
    if args.n_gpu > 1:  # CUDA was initialised before the script could pin one GPU (e.g. imported, not run)
        raise SystemExit(
            f"transformers.Trainer sees {args.n_gpu} GPUs and would train through DataParallel with a "
            f"{args.n_gpu}× batch; set CUDA_VISIBLE_DEVICES to one device"
        )
    return args


def _trainer(bench: Bench, model: torch.nn.Module, **extra: Any) -> Any:
    from transformers import PrinterCallback, Trainer

    trainer = Trainer(
        model=model,
        args=_training_args(bench, **extra),
        train_dataset=bench.data.train,
        eval_dataset=bench.data.dev,
        processing_class=bench.tokenizer,
    )
    trainer.remove_callback(PrinterCallback)  # with tqdm off it prints the final metrics dict
    return trainer


def train_hf_trainer(bench: Bench, grouped: bool) -> float:
    from transformers import TrainerCallback

    times: dict[str, float] = {}
    device = bench.device

    class EpochClock(TrainerCallback):
        """Times the epoch's loop only, as the other contenders are timed."""

        def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(device)
            times["start"] = time.perf_counter()

        def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            _sync(device)
            times["end"] = time.perf_counter()

    extra = {"train_sampling_strategy": "group_by_length"} if grouped else {}
    trainer = _trainer(bench, bench.fresh_model(), **extra)
    trainer.add_callback(EpochClock())
    trainer.train()
    return bench.examples / (times["end"] - times["start"])


def padded_tensors(bench: Bench, split: str) -> dict[str, torch.Tensor]:
    """The split padded to max length, once, up front (as the CLUE baselines' feature files are)."""
    ds = bench.data.train if split == "train" else bench.data.dev
    cols = [c for c in ("input_ids", "token_type_ids", "attention_mask") if c in ds.column_names]
    features = [{c: row[c] for c in cols} for row in ds]
    enc = bench.tokenizer.pad(features, padding="max_length", max_length=bench.cfg.max_length, return_tensors="pt")
    enc = dict(enc)
    enc["labels"] = torch.tensor(ds["labels"])
    return enc


def train_pad128(bench: Bench, tensors: dict[str, torch.Tensor]) -> float:
    from transformers import get_linear_schedule_with_warmup

    cfg, device = bench.cfg, bench.device
    model = bench.fresh_model()
    model.train()
    _, autocast = autocast_for(cfg, device)
    # clue_adv's own optimizer: the ratio to clue_adv then measures padding, not the optimizer's implementation.
    optimizer = build_optimizer(model, cfg, device)
    n = len(tensors["labels"])
    steps = math.ceil(n / cfg.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, round(cfg.optim.warmup_ratio * steps), steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    _sync(device)
    start = time.perf_counter()
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, cfg.batch_size):
        idx = order[i : i + cfg.batch_size]
        batch = {k: v[idx].to(device, non_blocking=True) for k, v in tensors.items()}
        with autocast():
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or float("inf"))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # the baselines log the loss every step
    _sync(device)
    return n / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------------
# Evaluation contenders: samples/s over the dev subset


def eval_clue_adv(bench: Bench, model: torch.nn.Module) -> float:
    loader = eval_loader(bench.data.dev, bench.tokenizer, bench.cfg.eval.batch_size)
    _, autocast = autocast_for(bench.cfg, bench.device)
    _sync(bench.device)
    start = time.perf_counter()
    result = evaluate(model, loader, bench.device, len(bench.data.labels.ids), autocast)
    _sync(bench.device)
    return result["examples"] / (time.perf_counter() - start)


def eval_trainer(bench: Bench, model: torch.nn.Module) -> float:
    trainer = _trainer(bench, model)
    _sync(bench.device)
    start = time.perf_counter()
    trainer.evaluate()
    _sync(bench.device)
    return len(bench.data.dev) / (time.perf_counter() - start)


@torch.no_grad()
def eval_pad128(bench: Bench, model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> float:
    _, autocast = autocast_for(bench.cfg, bench.device)
    model.eval()
    n, bs = len(tensors["labels"]), bench.cfg.eval.batch_size
    _sync(bench.device)
    start = time.perf_counter()
    correct = 0
    for i in range(0, n, bs):
        batch = {k: v[i : i + bs].to(bench.device) for k, v in tensors.items()}
        labels = batch.pop("labels")
        with autocast():
            logits = model(**batch).logits
        correct += int((logits.argmax(-1) == labels).sum())
    _sync(bench.device)
    return n / (time.perf_counter() - start)


# ------------------------------------------------------------------------------------------------------
# Padding: how many token positions each contender's batches hold (explains most of the differences)


def length_grouped_minimum(lengths: list[int], batch_size: int, multiple: int | None = None) -> int:
    """The fewest token positions any split of the examples into batches of `batch_size` (one smaller batch
    when it does not divide) can hold with dynamic padding, each batch padded to its longest example rounded
    up to `multiple`: sort by length and cut from the shortest, so that the smaller batch holds the longest
    examples. (Exchange argument: whichever batch holds the longest example pays its length on every row, so
    it should have the fewest rows and the next longest examples; then repeat on the rest.)"""
    ordered = sorted(lengths)
    total = 0
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        longest = chunk[-1] if multiple is None else -(-chunk[-1] // multiple) * multiple
        total += longest * len(chunk)
    return total


def padded_token_counts(bench: Bench) -> dict[str, int]:
    from clue_adv.data import train_loader

    multiple = pad_multiple_for(bench.device)  # as train.py pads on this device
    counts: dict[str, int] = {}
    for name, grouped in (("clue_adv", True), ("clue_adv_random", False)):
        cfg = bench.cfg.model_copy(deep=True)
        cfg.data.length_grouped = grouped
        loader = train_loader(bench.data.train, bench.tokenizer, cfg, multiple)
        counts[name] = sum(int(b["input_ids"].numel()) for b in loader)
    for name, extra in (("trainer", {}), ("trainer_grouped", {"train_sampling_strategy": "group_by_length"})):
        loader = _trainer(bench, bench.fresh_model(), **extra).get_train_dataloader()
        counts[name] = sum(int(b["input_ids"].numel()) for b in loader)
    counts["pad128"] = bench.examples * bench.cfg.max_length
    lengths = [len(ids) for ids in bench.data.train["input_ids"]]
    counts["real_tokens"] = sum(lengths)
    counts["length_grouped_minimum"] = length_grouped_minimum(lengths, bench.cfg.batch_size, multiple)
    return counts


def run_task(
    task: str,
    *,
    architecture: dict[str, int],
    device: torch.device,
    train_examples: int,
    eval_examples: int,
    rounds: int,
    seed: int,
    workdir: Path,
    contenders: tuple[str, ...] = TRAIN_CONTENDERS,
) -> Bench:
    cfg = common.run_config(
        task=task,
        architecture=architecture,
        device=device,
        data={"max_train_samples": train_examples, "max_eval_samples": eval_examples},
        epochs=1,
        seed=seed,
        output_dir=str(workdir / "runs"),
        log_every_n_steps=10,
    )
    configure_environment(cfg)
    tokenizer = common.load_tokenizer()
    bench = Bench(cfg, tokenizer, load_task_data(cfg, tokenizer), device, workdir)
    train_tensors, dev_tensors = padded_tensors(bench, "train"), padded_tensors(bench, "dev")
    bench.padded_tokens = padded_token_counts(bench)

    train_fns: dict[str, Callable[[], float]] = {
        "clue_adv": lambda: train_clue_adv(bench, True),
        "clue_adv_random": lambda: train_clue_adv(bench, False),
        "trainer": lambda: train_hf_trainer(bench, False),
        "trainer_grouped": lambda: train_hf_trainer(bench, True),
        "pad128": lambda: train_pad128(bench, train_tensors),
    }
    eval_model = bench.fresh_model()
    eval_fns: dict[str, Callable[[], float]] = {
        "clue_adv": lambda: eval_clue_adv(bench, eval_model),
        "trainer": lambda: eval_trainer(bench, eval_model),
        "pad128": lambda: eval_pad128(bench, eval_model, dev_tensors),
    }
    rng = random.Random(seed)
    for r in range(rounds):
        order = [c for c in contenders if c in train_fns]
        rng.shuffle(order)
        for name in order:
            sps = train_fns[name]()
            bench.train_sps.setdefault(name, []).append(sps)
            print(f"{task} round {r + 1}: train {name:16s} {sps:8.1f} samples/s", flush=True)
        order = list(eval_fns)
        rng.shuffle(order)
        for name in order:
            sps = eval_fns[name]()
            bench.eval_sps.setdefault(name, []).append(sps)
            print(f"{task} round {r + 1}: eval  {name:16s} {sps:8.1f} samples/s", flush=True)
    return bench


def task_summary(bench: Bench) -> dict[str, Any]:
    def table(sps: dict[str, list[float]], reference: str) -> dict[str, Any]:
        medians = {name: common.quantiles(v)[1] for name, v in sps.items()}
        out = {}
        # Rows in a fixed order (clue_adv first), not in the order the first round happened to run.
        ranked = list(TRAIN_CONTENDERS)
        for name, values in sorted(sps.items(), key=lambda kv: ranked.index(kv[0]) if kv[0] in ranked else 99):
            q25, median, q75 = common.quantiles(values)
            out[name] = {
                "samples_per_s_median": median,
                "samples_per_s_iqr": [q25, q75],
                # Other jobs can only slow a run down: the best round is the cross-check for a disturbed median.
                "samples_per_s_best": max(values),
                "runs": values,
                f"{reference}_speedup_over": medians.get(reference, float("nan")) / median,
            }
        return out

    train_rows = table(bench.train_sps, "clue_adv")
    for name, row in train_rows.items():
        row["padded_tokens"] = bench.padded_tokens.get(name)
    clue = train_rows.get("clue_adv", {}).get("samples_per_s_median")
    targets = {}
    for name, needed in TARGETS.items():
        if clue is not None and name in train_rows:
            got = clue / train_rows[name]["samples_per_s_median"]
            targets[f"clue_adv_over_{name}"] = {
                "ratio": got,
                "ratio_of_best_rounds": train_rows["clue_adv"]["samples_per_s_best"]
                / train_rows[name]["samples_per_s_best"],
                "target": needed,
                "meets_target": got >= needed,
            }
    comparisons = {}
    for key, (faster, slower, what) in COMPARISONS.items():
        if faster in train_rows and slower in train_rows:
            comparisons[key] = {
                "ratio": train_rows[faster]["samples_per_s_median"] / train_rows[slower]["samples_per_s_median"],
                "ratio_of_best_rounds": train_rows[faster]["samples_per_s_best"]
                / train_rows[slower]["samples_per_s_best"],
                "padded_token_ratio": bench.padded_tokens[slower] / bench.padded_tokens[faster],
                "compares": what,
            }
    return {
        "train_examples": bench.examples,
        "dev_examples": len(bench.data.dev),
        "mean_tokens_per_example": bench.padded_tokens["real_tokens"] / bench.examples,
        "real_tokens": bench.padded_tokens["real_tokens"],
        "length_grouped_minimum_tokens": bench.padded_tokens["length_grouped_minimum"],
        "train": train_rows,
        "eval": table(bench.eval_sps, "clue_adv"),
        "targets": targets,
        "like_with_like": comparisons,
    }


def markdown(payload: dict[str, Any]) -> str:
    info, setup = payload["machine"], payload["setup"]
    lines = [
        f"# Fine-tuning throughput ({setup['shape']} BERT, {info['device']})",
        "",
        *common.machine_markdown(info),
        f"- Model: {setup['shape']} ({setup['architecture'] or 'bert-base-chinese config'}), random init, "
        f"{setup['precision']}; batch {setup['batch_size']}, max length {setup['max_length']}, eval batch "
        f"{setup['eval_batch_size']}; plain fine-tuning (strategy none)",
        f"- Rounds: {setup['rounds']} (every contender once per round, shuffled order); medians over rounds",
        f"- Wall time of the whole benchmark: {setup['wall_time_s']} s",
        "",
        (
            "GPU timings."
            if info["device"] == "cuda"
            else "CPU only, on a machine shared with other jobs (see the load average): compare the ratios, "
            "measured side by side, not the absolute samples/s. No GPU was available for this run; the CUDA path "
            "(bf16 autocast, synchronised timing) exists but is not measured here."
        ),
        "",
        "Training: samples/s over one epoch's loop (data loading included; setup and evaluation excluded). "
        "`best round` = the fastest of the rounds (other jobs only ever slow a run down, so a median far below it "
        "means disturbed rounds). `clue_adv ×` = clue_adv's (length-grouped) median samples/s divided by this row's. "
        "`padded tokens` = token positions in the epoch's batches (real tokens + padding). The targets pit "
        "length-grouped clue_adv against Trainer's defaults (random batches) and against pad128; the like-with-like "
        "pairs are listed under each task.",
        "",
        *[f"- `{name}`: {text}" for name, text in DESCRIPTIONS.items() if name in TRAIN_CONTENDERS],
        "",
        "Dev evaluation: samples/s over the dev subset, batch size as above, no gradients.",
        "",
        *[f"- `{name}`: {text}" for name, text in EVAL_DESCRIPTIONS.items()],
    ]
    for task, s in payload["tasks"].items():
        lines += [
            "",
            f"## {task.upper()} ({s['train_examples']} training examples, {s['dev_examples']} dev; "
            f"{s['mean_tokens_per_example']:.1f} tokens per example incl. [CLS]/[SEP])",
            "",
            "| training loop | samples/s (median) | IQR | best round | clue_adv × | padded tokens | padding share |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in s["train"].items():
            padded = r["padded_tokens"]
            share = 1 - s["real_tokens"] / padded if padded else None
            lines.append(
                f"| {name} | {r['samples_per_s_median']:.1f} | {r['samples_per_s_iqr'][0]:.1f}–"
                f"{r['samples_per_s_iqr'][1]:.1f} | {r['samples_per_s_best']:.1f} | {r['clue_adv_speedup_over']:.2f} | "
                f"{padded} | "
                f"{common.fmt(share and 100 * share, 0)}% |"
            )
        lines += ["", "| dev evaluation | samples/s (median) | IQR | clue_adv × |", "|---|---|---|---|"]
        for name, r in s["eval"].items():
            lines.append(
                f"| {name} | {r['samples_per_s_median']:.1f} | {r['samples_per_s_iqr'][0]:.1f}–"
                f"{r['samples_per_s_iqr'][1]:.1f} | {r['clue_adv_speedup_over']:.2f} |"
            )
        lines += [
            "",
            f"Length-grouped minimum (sorted by length, cut into batches): {s['length_grouped_minimum_tokens']} "
            f"padded tokens; real tokens: {s['real_tokens']}.",
        ]
        if s["targets"]:
            lines += [""]
            for key, t in s["targets"].items():
                mark = "✓" if t["meets_target"] else "✗"
                target_note = "" if task == "tnews" else " (the target is for TNEWS; reported for reference)"
                lines.append(
                    f"- {key}: {t['ratio']:.2f} (target ≥ {t['target']}) {mark}{target_note}; best rounds: "
                    f"{t['ratio_of_best_rounds']:.2f}"
                )
        for key, c in s.get("like_with_like", {}).items():
            lines.append(
                f"- {key} (like with like: {c['compares']}): {c['ratio']:.2f}; best rounds: "
                f"{c['ratio_of_best_rounds']:.2f} (padded-token ratio {c['padded_token_ratio']:.2f})"
            )
    if payload.get("notes"):
        lines += ["", "## Notes", "", *payload["notes"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="tnews,iflytek", help="comma-separated: tnews, iflytek")
    p.add_argument(
        "--train-examples",
        type=int,
        help=f"training examples per epoch, a subset (default: {DEFAULT_TRAIN_EXAMPLES})",
    )
    p.add_argument("--eval-examples", type=int, default=1000, help="dev examples (IFLYTEK's bundled dev has 400)")
    p.add_argument("--rounds", type=int, default=5, help="the median over 5 shrugs off two disturbed rounds")
    p.add_argument("--contenders", default=",".join(TRAIN_CONTENDERS))
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--shape", choices=sorted(common.SHAPES), help="default: base on a GPU, tiny on CPU")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads (default 1: on a shared machine one descheduled thread of two stalls every "
        "parallel region, which makes 2-thread timings swing several-fold)",
    )
    p.add_argument("--output-dir", type=Path, default=common.RESULTS)
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section of the .md")
    args = p.parse_args(argv)
    trainers = [c for c in args.contenders.split(",") if c.startswith("trainer")]
    if trainers and importlib.util.find_spec("accelerate") is None:
        p.exit(
            2,
            f"error: the {', '.join(trainers)} contender(s) run transformers.Trainer, which needs accelerate: "
            "pip install -e '.[bench]' (or leave them out with --contenders clue_adv,clue_adv_random,pad128)\n",
        )
    if args.shape is None:
        args.shape = "base" if common.resolve_device(args.device).type == "cuda" else "tiny"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    info = common.machine_info(device, common.command_line(__file__, argv))
    architecture = common.SHAPES[args.shape]
    started = time.perf_counter()
    tasks: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="clue_adv_bench_") as tmp:
        # A private tokenization cache: nothing outside the temporary directory is touched.
        os.environ["CLUE_ADV_CACHE"] = str(Path(tmp) / "cache")
        for task in args.tasks.split(","):
            with contextlib.redirect_stderr(sys.stderr):
                bench = run_task(
                    task,
                    architecture=architecture,
                    device=device,
                    train_examples=args.train_examples or DEFAULT_TRAIN_EXAMPLES[task],
                    eval_examples=args.eval_examples,
                    rounds=args.rounds,
                    seed=args.seed,
                    workdir=Path(tmp) / task,
                    contenders=tuple(args.contenders.split(",")),
                )
            tasks[task] = task_summary(bench)
            precision = autocast_for(bench.cfg, device)[0]
            batch_size, max_length, eval_bs = bench.cfg.batch_size, bench.cfg.max_length, bench.cfg.eval.batch_size
    common.finish_info(info)
    payload = {
        "machine": info,
        "setup": {
            "shape": args.shape,
            "architecture": architecture,
            "precision": precision,
            "batch_size": batch_size,
            "max_length": max_length,
            "eval_batch_size": eval_bs,
            "rounds": args.rounds,
            "seed": args.seed,
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "wall_time_s": round(time.perf_counter() - started, 1),
        },
        "tasks": tasks,
        "notes": args.note,
    }
    json_path, md_path = common.write_outputs(
        f"throughput-{common.device_tag(device)}", payload, markdown(payload), args.output_dir
    )
    print(markdown(payload))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
