"""Masked-LM pretraining throughput: clue_adv's pretrain step vs Hugging Face's BertForMaskedLM as is.

Contenders, each with its own copy of the same random-init model and its own optimizer (clue_adv's: fused AdamW
without decay on biases/LayerNorm), stepping over the same texts:

  hf                BertForMaskedLM(**batch).loss with DataCollatorForLanguageModeling(mlm_probability=0.15):
                    dynamic padding, logits over the whole vocabulary at every position
  clue_adv          clue_adv.pretrain: its padding and BERT masking, logits at the targets only; the same batches
                    (the same texts in the same order) as hf
  clue_adv_grouped  the same, on clue_adv's default length-grouped batches of the same texts (less padding)

A step is what the pretrain loop does per batch: collate and mask, forward, backward, clip the gradient norm, AdamW
step. After warm-up steps, the contenders take turns one step at a time in a shuffled order each round (the machine
is shared, so a slow spell hits all of them); ratios are medians over rounds of step-time ratios within a round.

    python scripts/bench_pretrain.py                  # tiny BERT (2 x 128, real vocabulary), batch 64 x 128, CPU
    python scripts/bench_pretrain.py --steps 5        # quicker
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _bench_common as common  # noqa: E402
import torch  # noqa: E402

from clue_adv.pretrain.config import PretrainConfig  # noqa: E402
from clue_adv.pretrain.masking import BatchOrder, Masker, generator_for, pad  # noqa: E402
from clue_adv.pretrain.mlm import MlmBatch, build_masked_lm, mlm_loss  # noqa: E402
from clue_adv.pretrain.text import read_texts  # noqa: E402
from clue_adv.train import autocast_for, build_optimizer  # noqa: E402

DESCRIPTIONS = {
    "hf": "BertForMaskedLM + DataCollatorForLanguageModeling (full-vocabulary logits at every position)",
    "clue_adv": "clue_adv.pretrain step (logits at the targets only), the same batches as hf",
    "clue_adv_grouped": "clue_adv.pretrain step on its default length-grouped batches of the same texts",
}
TARGET = "clue_adv"  # the like-with-like comparison: the same batches as hf


@dataclass
class Contender:
    name: str
    step: Callable[[int], int]  # batch number -> real tokens in it
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # padded positions (batch x length) per step
    losses: list[float] = field(default_factory=list)


def pretrain_config(args: argparse.Namespace, device: torch.device) -> PretrainConfig:
    from clue_adv.pretrain.config import parse_pretrain_config

    return parse_pretrain_config(
        {
            "experiment": "bench",
            "task": args.task,
            "data": {"path": str(common.ASSETS / args.task), "max_texts": args.texts},
            "model": {
                "name_or_path": str(common.TOKENIZER_DIR),
                "init": "random",
                "architecture": common.SHAPES[args.shape],
            },
            "max_length": args.max_length,
            "batch_size": args.batch_size,
            "max_steps": args.steps + args.warmup,
            "optim": {"lr": 1e-3},
            "device": device.type,
        },
        source="benchmark config",
    )


def build(args: argparse.Namespace, device: torch.device) -> tuple[list[Contender], dict[str, Any]]:
    from transformers import DataCollatorForLanguageModeling, set_seed

    cfg = pretrain_config(args, device)
    tokenizer = common.load_tokenizer()
    texts, _ = read_texts(cfg)  # as the pretrain reads them: TNEWS title + keywords
    ids = tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]
    lengths = [len(s) for s in ids]
    random_order = BatchOrder(lengths, args.batch_size, args.seed, length_grouped=False)
    grouped_order = BatchOrder(lengths, args.batch_size, args.seed, length_grouped=True)
    masker = Masker(tokenizer, cfg.mlm)
    hf_collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.mlm.probability, return_tensors="pt")
    hf_collator.generator = None  # draws from torch's global generator, seeded below
    _, autocast = autocast_for(cfg, device)

    def fresh_model() -> torch.nn.Module:
        set_seed(args.seed)
        return build_masked_lm(cfg).to(device).train()

    def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    # Length-grouped batches run long to short within each window of 50: a short benchmark measures batches drawn
    # from across the epoch, not its first (longest) ones.
    spread = random.Random(args.seed).sample(range(len(grouped_order)), len(grouped_order))

    def clue_adv_step(grouped: bool, contender: Contender) -> Callable[[int], int]:
        model = fresh_model()
        optimizer = build_optimizer(model, cfg, device)

        def step(number: int) -> int:
            texts = grouped_order.indices(spread[number % len(spread)]) if grouped else random_order.indices(number)
            batch_ids, attention = pad([ids[i] for i in texts], tokenizer.pad_token_id)
            inputs, labels = masker(batch_ids, attention, generator_for(args.seed, "mask", number))
            result = mlm_loss(model, MlmBatch(inputs, attention, labels).to(device), autocast)
            result.loss.backward()
            optimizer_step(model, optimizer)
            contender.losses.append(float(result.loss.detach()))
            contender.positions.append(attention.numel())
            return int(attention.sum())

        return step

    def hf_step(contender: Contender) -> Callable[[int], int]:
        model = fresh_model()
        optimizer = build_optimizer(model, cfg, device)

        def step(number: int) -> int:
            torch.manual_seed(number)
            batch = hf_collator([{"input_ids": ids[i]} for i in random_order.indices(number)])
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                loss = model(**batch).loss
            loss.backward()
            optimizer_step(model, optimizer)
            contender.losses.append(float(loss.detach()))
            contender.positions.append(batch["attention_mask"].numel())
            return int(batch["attention_mask"].sum())

        return step

    contenders = []
    for name in ("hf", "clue_adv", "clue_adv_grouped"):
        contender = Contender(name, lambda n: 0)
        if name == "hf":
            contender.step = hf_step(contender)
        else:
            contender.step = clue_adv_step(name == "clue_adv_grouped", contender)
        contenders.append(contender)
    setup = {
        "texts": len(ids),
        "mean_tokens_per_text": statistics.fmean(lengths),
        "masking": f"{cfg.mlm.probability:g}, {cfg.mlm.replace_mask:g}/{cfg.mlm.replace_random:g}/rest kept",
    }
    return contenders, setup


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(contenders: list[Contender], steps: int, warmup: int, device: torch.device, seed: int) -> None:
    rng = random.Random(seed)
    for number in range(warmup + steps):
        for contender in rng.sample(contenders, len(contenders)):
            _sync(device)
            start = time.perf_counter()
            tokens = contender.step(number)
            _sync(device)
            if number >= warmup:
                contender.times.append(time.perf_counter() - start)
                contender.tokens.append(tokens)
        print(f"round {number + 1}/{warmup + steps}", flush=True)
    for contender in contenders:  # the warm-up rounds' bookkeeping is not measured
        contender.positions = contender.positions[warmup:]
        contender.losses = contender.losses[warmup:]


def summarize(contenders: list[Contender]) -> dict[str, dict[str, Any]]:
    by_name = {c.name: c for c in contenders}
    hf = by_name["hf"]
    out = {}
    for c in contenders:
        _, median, _ = common.quantiles(c.times)
        out[c.name] = {
            "description": DESCRIPTIONS[c.name],
            "median_step_s": median,
            "best_step_s": min(c.times),
            "steps_per_s": 1 / median,
            "tokens_per_s": statistics.median(t / s for t, s in zip(c.tokens, c.times, strict=True)),
            "real_tokens_per_step": statistics.fmean(c.tokens),
            "padded_positions_per_step": statistics.fmean(c.positions),
            "step_time_ratio_hf_over_this": statistics.median(h / s for h, s in zip(hf.times, c.times, strict=True)),
            "tokens_per_s_over_hf": statistics.median(
                (t / s) / (ht / hs) for t, s, ht, hs in zip(c.tokens, c.times, hf.tokens, hf.times, strict=True)
            ),
            "mean_loss": statistics.fmean(c.losses),
        }
    return out


def markdown(payload: dict[str, Any]) -> str:
    s, results = payload["setup"], payload["results"]
    target = results[TARGET]
    lines = [
        "# Masked-LM pretraining throughput: clue_adv vs Hugging Face BertForMaskedLM",
        "",
        *common.machine_markdown(payload["machine"]),
        "",
        f"Model: {s['shape']} BERT {s['architecture'] or '(bert-base-chinese config)'}, random init, "
        f"vocabulary 21,128; {s['precision']}; batch {s['batch_size']} texts, max length {s['max_length']}; "
        f"{s['task']} training text from the bundled sample ({s['texts']} texts, title + keywords, "
        f"{s['mean_tokens_per_text']:.1f} tokens each with [CLS]/[SEP]); masking {s['masking']}. "
        f"{s['steps']} measured steps per contender after {s['warmup']} warm-up steps, interleaved in shuffled "
        f"rounds; wall time {s['wall_time_s']} s.",
        "",
        "The machine is shared with other jobs (see the load average): compare the ratios, measured side by side in "
        "one run, not the absolute numbers.",
        "",
        "| contender | step (median; best) | steps/s | real tokens/s | padding | hf step / this step | "
        "tokens/s ÷ hf's |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        padding = 1 - r["real_tokens_per_step"] / r["padded_positions_per_step"]
        lines.append(
            f"| {name} | {r['median_step_s'] * 1000:.0f} ms; {r['best_step_s'] * 1000:.0f} ms | "
            f"{r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} | {100 * padding:.0f}% | "
            f"{r['step_time_ratio_hf_over_this']:.2f} | **{r['tokens_per_s_over_hf']:.2f}** |"
        )
    grouped = results["clue_adv_grouped"]
    lines += [
        "",
        f"On the same batches, clue_adv's pretrain step is **{target['step_time_ratio_hf_over_this']:.2f}×** as fast "
        "as BertForMaskedLM's (median over rounds of the per-round ratio). On its default length-grouped batches "
        f"(other batches of the same texts, so compare tokens per second) it processes "
        f"**{grouped['tokens_per_s_over_hf']:.2f}×** hf's real tokens per second. "
        "Ratios are medians of per-round ratios, so they need not equal the ratio of the medians.",
        "",
        *[f"- `{name}`: {r['description']}" for name, r in results.items()],
    ]
    if payload["notes"]:
        lines += ["", "## Notes", "", *payload["notes"]]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="measured steps per contender (after warm-up)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per contender")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--shape", choices=sorted(common.SHAPES), help="default: base on a GPU, tiny on CPU")
    p.add_argument("--task", choices=["tnews", "iflytek"], default="tnews")
    p.add_argument("--texts", type=int, default=4000, help="texts read from the bundled training sample")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (1: steady timings on a busy machine)")
    p.add_argument("--output-dir", type=Path, default=common.RESULTS)
    p.add_argument("--note", action="append", default=[], help="a line for the Notes section of the .md")
    args = p.parse_args(argv)
    if args.shape is None:
        args.shape = "base" if common.resolve_device(args.device).type == "cuda" else "tiny"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = common.resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    info = common.machine_info(device, common.command_line(__file__, argv))
    started = time.perf_counter()
    contenders, setup = build(args, device)
    run(contenders, args.steps, args.warmup, device, args.seed)
    common.finish_info(info)
    precision, _ = autocast_for(pretrain_config(args, device), device)
    payload = {
        "machine": info,
        "setup": {
            "shape": args.shape,
            "architecture": common.SHAPES[args.shape],
            "precision": precision,
            "task": args.task,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "steps": args.steps,
            "warmup": args.warmup,
            "seed": args.seed,
            **setup,
            "wall_time_s": round(time.perf_counter() - started, 1),
        },
        "results": summarize(contenders),
        "notes": args.note,
    }
    json_path, md_path = common.write_outputs(
        f"pretrain-throughput-{common.device_tag(device)}", payload, markdown(payload), args.output_dir
    )
    print(markdown(payload))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
