"""What each training strategy costs: step time relative to plain fine-tuning, passes, peak memory.

Every registered strategy (default parameters; a strategy with a `mode` field gets one row per mode,
e.g. `gradient_penalty[finite_difference]`) trains its own copy of the same random-init model on the
same fixed batches of real TNEWS titles. After a warm-up, the strategies take turns, one step each per
round, in a freshly shuffled order every round, so a slow spell on the shared machine hits all of them
alike; the ratio to `none` is the median over rounds of the within-round ratio. A step is
clue_adv.train.train_step on one micro-batch: `strategy.training_step`, gradient clipping, the optimizer step.

Peak memory is measured in a fresh process per strategy (CUDA max allocated on a GPU; peak RSS on CPU,
where the whole process's resident memory is the only honest number).

    python scripts/bench_strategies.py                          # CPU: tiny BERT; GPU: BERT-base shape, bf16
    python scripts/bench_strategies.py --steps 5 --strategies fgm,vat
    python scripts/bench_strategies.py --profile fgm            # torch.profiler table for one row
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_common as common  # noqa: E402
import torch  # noqa: E402

from clue_adv.config import RunConfig  # noqa: E402
from clue_adv.data import bundled_labels  # noqa: E402
from clue_adv.model import build_model, special_token_ids  # noqa: E402
from clue_adv.regularizers import build_strategy, registry  # noqa: E402
from clue_adv.regularizers.base import Batch, Strategy, StrategyConfig  # noqa: E402
from clue_adv.runstate import NONFINITE_QUANTITY  # noqa: E402
from clue_adv.train import (  # noqa: E402
    Learner,
    autocast_for,
    build_optimizer,
    pad_multiple_for,
    train_step,
)

# Issue 6's targets: step time as a multiple of the `none` step. PGD and FreeLB targets are for K = 3.
TARGETS: dict[str, float] = {
    "fgm": 2.0,
    "pgd": 4.0,
    "freelb": 4.0,
    "vat": 2.1,
    "consistency": 2.0,
    "rdrop": 2.0,
    "gradient_penalty[exact]": 2.6,
    "gradient_penalty[finite_difference]": 2.1,
}
# Literal-typed config fields whose every value is benchmarked as its own row.
VARIANT_FIELDS = ("mode",)


@dataclass
class Row:
    label: str
    config: StrategyConfig
    target: float | None = None

    @property
    def strategy_name(self) -> str:
        return self.config.name


def _literal_values(config_class: type[StrategyConfig], name: str) -> tuple[Any, ...]:
    info = config_class.model_fields.get(name)
    if info is None or get_origin(info.annotation) is not Literal:
        return ()
    return get_args(info.annotation)


def strategy_rows(only: list[str] | None = None) -> list[Row]:
    """One row per registered strategy (and per value of a variant field), `none` first and always present.

    `only` selects by strategy name (all its variants) or by exact row label."""
    rows: list[Row] = []
    for name, cls in registry().items():
        variants: list[tuple[str, StrategyConfig]] = []
        for fname in VARIANT_FIELDS:
            for value in _literal_values(cls.config_class, fname):
                variants.append((f"{name}[{value}]", cls.config_class(**{fname: value})))
        if not variants:
            variants = [(name, cls.config_class())]
        for label, config in variants:
            if only is not None and name != "none" and name not in only and label not in only:
                continue
            rows.append(Row(label, config, TARGETS.get(label, TARGETS.get(name))))
    if only is not None:
        known = {r.label for r in strategy_rows()} | set(registry())
        unknown = [o for o in only if o not in known]
        if unknown:
            raise SystemExit(f"--strategies: unknown {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return rows


def cost_estimate(strategy: Strategy) -> float:
    """Step-time ratio the declared passes suggest (backward ≈ 2 forwards; a double backward ≈ one more
    forward + backward): the reference for strategies the issue sets no target for."""
    cost = strategy.cost()
    # In passes over B examples: consistency's one pass of the batch stacked twice costs two.
    return (cost.forward_at_batch + 2 * cost.backward_at_batch + (3 if cost.double_backward else 0)) / 3


# ------------------------------------------------------------------------------------------------------
# One contender: a strategy with its own model copy and optimizer


@dataclass
class Contender:
    row: Row
    cfg: RunConfig
    learner: Learner
    precision: str
    device: torch.device
    step_ms: list[float] = field(default_factory=list)
    strategy_ms: list[float] = field(default_factory=list)
    passes: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def strategy(self) -> Strategy:
        return self.learner.strategy

    @property
    def model(self) -> torch.nn.Module:
        return self.learner.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.learner.optimizer

    def step(self, raw: dict[str, torch.Tensor], record: bool = True) -> None:
        """One optimizer step on one micro-batch (no accumulation, a fixed learning rate): clue_adv.train's own
        `train_step`, timed in whole and up to the gradients (the strategy's part)."""
        cuda = self.device.type == "cuda"
        batch = Batch.from_mapping(raw, self.device)
        counter = self.learner.counter
        counter.reset()
        if cuda:
            torch.cuda.synchronize(self.device)
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
        start = time.perf_counter()
        middle = start

        def gradients_in() -> None:
            nonlocal middle
            if cuda:
                marks[1].record()
            middle = time.perf_counter()

        out = train_step(self.learner, [batch], on_gradients=gradients_in)
        if cuda:
            marks[2].record()
            torch.cuda.synchronize(self.device)
            total, part = marks[0].elapsed_time(marks[2]), marks[0].elapsed_time(marks[1])
        else:
            end = time.perf_counter()
            total, part = (end - start) * 1e3, (middle - start) * 1e3
        if nonfinite := int(out.nonfinite):  # read after the timing; train_step skipped the update on the device
            raise RuntimeError(f"{self.row.label}: non-finite {NONFINITE_QUANTITY[nonfinite]} in the benchmark")
        if record:
            self.step_ms.append(total)
            self.strategy_ms.append(part)
            self.passes.append((counter.forward, counter.backward, counter.double_backward))


def build_contender(
    row: Row,
    architecture: dict[str, Any],
    device: torch.device,
    task: str,
    seed: int,
    model: torch.nn.Module | None = None,
    **fields: Any,
) -> Contender:
    """A strategy with its own model (or `model`, shared: scripts/gpu_check.py's probes build one per attention
    implementation and pass it to every strategy that runs on it) and optimizer; `fields` go to the run config
    (e.g. `precision="fp32"`)."""
    from transformers import set_seed

    cfg = common.run_config(
        task=task, architecture=architecture, device=device, strategy=row.config.model_dump(), **fields
    )
    strategy = build_strategy(cfg.strategy)
    if model is None:
        set_seed(seed)  # every contender starts from the same initial weights
        model = build_model(cfg, bundled_labels(task), strategy.needs_double_backward).to(device)
    model.train()
    strategy.setup(model)
    optimizer = build_optimizer(model, cfg, device)
    precision, autocast = autocast_for(cfg, device)
    learner = Learner(
        model,
        strategy,
        optimizer,
        autocast=autocast,
        label_smoothing=cfg.label_smoothing,
        max_grad_norm=cfg.optim.max_grad_norm,
        special_token_ids=special_token_ids(common.load_tokenizer()),
    )
    return Contender(row=row, cfg=cfg, learner=learner, precision=precision, device=device)


def interleave(
    contenders: list[Contender], batches: list[dict[str, torch.Tensor]], steps: int, warmup: int, seed: int
) -> None:
    """Warm-up, then `steps` rounds of one step per contender in a shuffled order (the same batch per round)."""
    for i in range(warmup):
        for c in contenders:
            c.step(batches[i % len(batches)], record=False)
    rng = random.Random(seed)
    for i in range(steps):
        order = list(contenders)
        rng.shuffle(order)
        for c in order:
            c.step(batches[(warmup + i) % len(batches)])


# ------------------------------------------------------------------------------------------------------
# Peak memory, one fresh process per strategy


def _proc_status_mb(key: str) -> float:
    """VmRSS (now) or VmHWM (peak) of this process. Not ru_maxrss: that survives exec, so a child started
    from a big parent would report the parent's size."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def probe_memory(args: argparse.Namespace) -> dict[str, float]:
    """Run in a child process: build one contender, take steps, report the peak."""
    device = common.resolve_device(args.device)
    config = json.loads(args.probe_memory)
    row = Row(config["name"], registry()[config["name"]].config_class.model_validate(config))
    tokenizer = common.load_tokenizer()
    batches = common.fixed_batches(
        tokenizer,
        task=args.task,
        count=3,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        pad_to_multiple_of=pad_multiple_for(device),
    )
    c = build_contender(row, common.SHAPES[args.shape], device, args.task, args.seed)
    c.step(batches[0], record=False)  # allocates the optimizer state: part of the baseline, not of the step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device) / 2**20
    else:
        baseline = _proc_status_mb("VmRSS")
    for b in batches:
        c.step(b, record=False)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak = _proc_status_mb("VmHWM")
    return {"peak_memory_mb": peak, "step_memory_mb": peak - baseline, "baseline_memory_mb": baseline}


def memory_in_subprocess(row: Row, args: argparse.Namespace) -> dict[str, float] | None:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--probe-memory",
        row.config.model_dump_json(),
        *("--device", args.device, "--shape", args.shape, "--task", args.task),
        *("--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--seed", str(args.seed)),
        *("--threads", str(args.threads)),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        print(f"memory probe for {row.label} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------
# Profiling


def profile(contender: Contender, batches: list[dict[str, torch.Tensor]], steps: int, path: Path) -> None:
    """torch.profiler over `steps` steps of one contender: where its time goes, op by op."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if contender.device.type == "cuda" else [])
    for b in batches[:2]:
        contender.step(b, record=False)
    with torch_profile(activities=activities, record_shapes=False) as prof:
        for i in range(steps):
            contender.step(batches[i % len(batches)], record=False)
    sort = "self_cuda_time_total" if contender.device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# torch.profiler: {contender.row.label}, {steps} steps, sorted by {sort}\n\n{table}\n")
    print(f"wrote {path}")


# ------------------------------------------------------------------------------------------------------
# The run


def summarize(contenders: list[Contender], memory: dict[str, dict[str, float] | None]) -> dict[str, dict[str, Any]]:
    base = next(c for c in contenders if c.row.label == "none")
    results: dict[str, dict[str, Any]] = {}
    for c in contenders:
        paired = [t / b for t, b in zip(c.step_ms, base.step_ms)]
        paired_part = [t / b for t, b in zip(c.strategy_ms, base.strategy_ms)]
        r25, ratio, r75 = common.quantiles(paired)
        q25, median, q75 = common.quantiles(c.step_ms)
        _, part_median, _ = common.quantiles(c.strategy_ms)
        _, part_ratio, _ = common.quantiles(paired_part)
        fwd, bwd, dbl = (sum(p[k] for p in c.passes) / len(c.passes) for k in range(3))
        cost = c.strategy.cost()
        mem = memory.get(c.row.label) or {}
        target = c.row.target
        results[c.row.label] = {
            "strategy": c.row.strategy_name,
            "config": c.row.config.model_dump(mode="json"),
            "ratio_to_none": ratio,
            "ratio_iqr": [r25, r75],
            "target": target,
            "meets_target": None if target is None else ratio <= target,
            "cost_estimate": cost_estimate(c.strategy),
            "step_ms_median": median,
            "step_ms_iqr": [q25, q75],
            "training_step_ms_median": part_median,
            "training_step_ratio_to_none": part_ratio,
            "forward_passes": fwd,
            "backward_passes": bwd,
            "double_backward_passes": dbl,
            "declared": {
                "forward": cost.forward,
                "backward": cost.backward,
                "double_backward": cost.double_backward,
                "batch_factor": cost.batch_factor,
            },
            "attn_implementation": c.model.config._attn_implementation,
            "peak_memory_mb": mem.get("peak_memory_mb"),
            "step_memory_mb": mem.get("step_memory_mb"),
            "steps_measured": len(c.step_ms),
        }
    return results


def run(
    *,
    rows: list[Row],
    architecture: dict[str, int],
    device: torch.device,
    task: str = "tnews",
    batch_size: int = 32,
    max_length: int = 128,
    steps: int = 20,
    warmup: int = 3,
    seed: int = 1,
    batch_count: int = 8,
) -> tuple[list[Contender], dict[str, dict[str, Any]]]:
    """Time every row interleaved; return the contenders (for profiling) and the per-row results."""
    torch.manual_seed(seed)
    tokenizer = common.load_tokenizer()
    batches = common.fixed_batches(
        tokenizer,
        task=task,
        count=batch_count,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        pad_to_multiple_of=pad_multiple_for(device),
    )
    contenders = [build_contender(row, architecture, device, task, seed) for row in rows]
    interleave(contenders, batches, steps, warmup, seed)
    return contenders, summarize(contenders, {})


def markdown(payload: dict[str, Any]) -> str:
    info, setup, results = payload["machine"], payload["setup"], payload["strategies"]
    gpu_note = (
        "Absolute times are from a GPU."
        if info["device"] == "cuda"
        else "CPU only: the machine is shared with other jobs (see the load average), so only the ratios, "
        "measured side by side, mean anything; absolute times do not. No GPU was available for this run: the "
        "CUDA path (CUDA-event timing, bf16 autocast, `torch.cuda.max_memory_allocated`) exists but is not "
        "measured here."
    )
    multiple = f" to a multiple of {setup['pad_to_multiple_of']}" if setup.get("pad_to_multiple_of") else ""
    lines = [
        f"# Strategy cost benchmark ({setup['shape']} BERT, {info['device']})",
        "",
        *common.machine_markdown(info),
        f"- Model: {setup['shape']} ({setup['architecture'] or 'bert-base-chinese config'}), random init, "
        f"{setup['precision']}; batch {setup['batch_size']}, max length {setup['max_length']}, "
        f"{setup['task']} batches (dynamic padding{multiple}, mean padded length {setup['mean_padded_length']:.1f}); "
        f"optimizer {setup['optimizer']}",
        f"- Steps: {setup['warmup']} warm-up + {setup['steps']} measured per strategy, interleaved in a shuffled "
        "order each round",
        "",
        gpu_note,
        "",
        "ratio = median over rounds of (strategy step / `none` step in the same round); IQR of that ratio; "
        "a step = training_step + clip + AdamW step. `training_step ratio` leaves out the clip and optimizer "
        "step (the same for all). passes = forward / backward / double backward per step as counted by "
        "StepContext. Memory: peak "
        + ("CUDA max allocated" if info["device"] == "cuda" else "RSS of a fresh process")
        + " over a few steps, and its rise over the state after the first step (params + AdamW state)"
        + (
            "."
            if info["device"] == "cuda"
            else "; on CPU the rise is blurred by the allocator keeping freed memory, so compare the peaks "
            "(each from a fresh process, so the ~0.5 GB of Python + torch + model is in every one of them)."
        ),
        "",
        "| strategy | target | ratio | ratio IQR | training_step ratio | est. | step ms (median, IQR) | "
        "passes f/b/db | attention | peak MB | step MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in results.items():
        target = "–" if r["target"] is None else f"≤ {r['target']:.1f}" + (" ✓" if r["meets_target"] else " ✗")
        lines.append(
            f"| {label} | {target} | {r['ratio_to_none']:.2f} | {r['ratio_iqr'][0]:.2f}–{r['ratio_iqr'][1]:.2f} | "
            f"{r['training_step_ratio_to_none']:.2f} | {r['cost_estimate']:.2f} | "
            f"{r['step_ms_median']:.1f} ({r['step_ms_iqr'][0]:.1f}–{r['step_ms_iqr'][1]:.1f}) | "
            f"{r['forward_passes']:g}/{r['backward_passes']:g}/{r['double_backward_passes']:g} | "
            f"{r['attn_implementation']} | {common.fmt(r['peak_memory_mb'], 0)} | "
            f"{common.fmt(r['step_memory_mb'], 0)} |"
        )
    lines += [
        "",
        "`est.` = (forward + 2·backward + 3·[double backward]) / 3 from the declared cost, for reference, with "
        "passes in units of the batch B (consistency's one pass on the batch stacked twice counts as two); the "
        "`passes` column counts passes as run.",
    ]
    missed = {label: r for label, r in results.items() if r["meets_target"] is False}
    lines += ["", "## Targets", ""]
    met = [f"{label} {r['ratio_to_none']:.2f} ≤ {r['target']}" for label, r in results.items() if r["meets_target"]]
    lines.append("Met: " + ("; ".join(met) if met else "none") + ".")
    for label, r in missed.items():
        lines.append(
            f"- **missed: {label}** {r['ratio_to_none']:.2f} > {r['target']} (training_step alone: "
            f"{r['training_step_ratio_to_none']:.2f}); see results/bench/README.md for the analysis."
        )
    if payload.get("notes"):
        lines += ["", "## Notes", "", *payload["notes"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", help="comma-separated strategy names or row labels (default: all registered)")
    p.add_argument("--steps", type=int, default=20, help="measured steps per strategy (after warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per strategy")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--shape", choices=sorted(common.SHAPES), help="default: base on a GPU, tiny on CPU")
    p.add_argument("--task", choices=["tnews", "iflytek"], default="tnews", help="whose batches give the shapes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU intra-op threads (default 1: on a shared machine one descheduled thread of two stalls every "
        "parallel region, which makes 2-thread timings swing several-fold)",
    )
    p.add_argument("--no-memory", action="store_true", help="skip the per-strategy memory processes")
    p.add_argument("--profile", help="comma-separated row labels to profile with torch.profiler after timing")
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--output-dir", type=Path, default=common.RESULTS)
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section of the .md")
    p.add_argument("--probe-memory", help=argparse.SUPPRESS)  # internal: child process for one row's memory
    args = p.parse_args(argv)
    if args.shape is None:
        args.shape = "base" if common.resolve_device(args.device).type == "cuda" else "tiny"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if common.resolve_device(args.device).type == "cpu":
        torch.set_num_threads(args.threads)
    if args.probe_memory:
        print(json.dumps(probe_memory(args)))
        return 0
    device = common.resolve_device(args.device)
    info = common.machine_info(device, common.command_line(__file__, argv))
    rows = strategy_rows(args.strategies.split(",") if args.strategies else None)
    architecture = common.SHAPES[args.shape]
    started = time.perf_counter()
    print(f"timing {len(rows)} rows on {device} ({args.shape}): {', '.join(r.label for r in rows)}", flush=True)
    contenders, _ = run(
        rows=rows,
        architecture=architecture,
        device=device,
        task=args.task,
        batch_size=args.batch_size,
        max_length=args.max_length,
        steps=args.steps,
        warmup=args.warmup,
        seed=args.seed,
    )
    memory: dict[str, dict[str, float] | None] = {}
    if not args.no_memory:
        for row in rows:
            print(f"memory: {row.label}", flush=True)
            memory[row.label] = memory_in_subprocess(row, args)
    results = summarize(contenders, memory)
    common.finish_info(info)
    batches = common.fixed_batches(
        common.load_tokenizer(),
        task=args.task,
        count=8,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        pad_to_multiple_of=pad_multiple_for(device),
    )
    defaults = contenders[0].optimizer.defaults
    payload = {
        "machine": info,
        "setup": {
            "shape": args.shape,
            "architecture": architecture,
            "precision": contenders[0].precision,
            "optimizer": f"torch.optim.AdamW(fused={defaults['fused']}), as clue_adv/train.py builds it",
            "pad_to_multiple_of": pad_multiple_for(device),
            "task": args.task,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "mean_padded_length": sum(b["input_ids"].shape[1] for b in batches) / len(batches),
            "steps": args.steps,
            "warmup": args.warmup,
            "seed": args.seed,
            "wall_time_s": round(time.perf_counter() - started, 1),
        },
        "strategies": results,
        "notes": args.note,
    }
    stem = f"strategies-{common.device_tag(device)}"
    json_path, md_path = common.write_outputs(stem, payload, markdown(payload), args.output_dir)
    print(markdown(payload))
    print(f"wrote {json_path} and {md_path}")
    if args.profile:
        by_label = {c.row.label: c for c in contenders}
        tokenizer = common.load_tokenizer()
        batches = common.fixed_batches(
            tokenizer,
            task=args.task,
            count=4,
            batch_size=args.batch_size,
            max_length=args.max_length,
            seed=args.seed,
            pad_to_multiple_of=pad_multiple_for(device),
        )
        for label in args.profile.split(","):
            if label not in by_label:
                raise SystemExit(f"--profile {label}: not among the timed rows")
            safe = label.replace("[", "-").replace("]", "")
            path = args.output_dir / f"profile-{safe}-{common.device_tag(device)}.txt"
            profile(by_label[label], batches, args.profile_steps, path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
