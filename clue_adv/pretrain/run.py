"""One pretraining run: setup in dependency order, the loop, checkpoints, resume, the output model.

    <output_dir>/<experiment>/<task, or text>/mlm-seed-<k>/
        config.yaml     the resolved pretrain config (the run's identity)
        metrics.jsonl   train lines (MLM loss, masked-token accuracy, lr, tokens/s) and held-out evaluations
        summary.json    status (running | completed | failed | interrupted), steps, time, held-out results
        checkpoint/     while unfinished: weights, optimizer state and counters (checkpoint.py); gone when completed
        model/          when completed: a Hugging Face model directory (config.json, model.safetensors, tokenizer
                        files) that `model.init: pretrained` + `model.name_or_path: <this directory>` fine-tunes
        .lock           held while a process writes the run

Running the same config again resumes from the checkpoint (saved every N steps or minutes, and on Ctrl-C/SIGTERM)
and reaches the same weights an uninterrupted run reaches: batches, masks and dropout depend only on the seed and
the batch number.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clue_adv.checks import check_pretrain_paths
from clue_adv.config import require_nameable
from clue_adv.errors import ConfigError, RunFailed, interrupts_deferred
from clue_adv.memory import peak_memory
from clue_adv.model import build_tokenizer, check_vocab_size
from clue_adv.pretrain.checkpoint import CHECKPOINT, load_checkpoint, read_checkpoint_state, save_checkpoint
from clue_adv.pretrain.config import PretrainConfig, parse_pretrain_config, run_directory
from clue_adv.pretrain.masking import IGNORE, BatchOrder, Masker, derived_seed, generator_for, pad
from clue_adv.pretrain.mlm import MlmBatch, build_masked_lm, evaluate_heldout, mlm_loss, mlm_parts
from clue_adv.pretrain.text import HELDOUT_SEED, load_texts
from clue_adv.progress import RunProgress
from clue_adv.rundir import (
    JsonlWriter,
    acquire_run_lock,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    existing_state,
    read_jsonl,
    read_summary,
    release_run_lock,
    replace_directory,
    start_run,
    utc_now,
)
from clue_adv.runenv import autocast_for, configure_environment, note_hub_use, resolve_device
from clue_adv.runstate import NonFiniteError
from clue_adv.summary import OOM_ADVICE, git_commit, library_versions
from clue_adv.train import build_optimizer

MODEL = "model"


@dataclass
class PretrainOutcome:
    directory: Path
    summary: dict[str, Any]
    skipped: bool = False

    @property
    def model_dir(self) -> Path:
        return self.directory / MODEL


def lr_factor(progress: float, warmup_ratio: float, schedule: str) -> float:
    """The learning rate's multiplier when `progress` (0..1) of the budget is used: linear warmup over `warmup_ratio`,
    then linear decay to 0 at the end (`linear`) or flat (`constant`); as Hugging Face's schedules, in steps."""
    if progress < warmup_ratio:
        return progress / warmup_ratio
    if schedule == "constant" or warmup_ratio >= 1:
        return 1.0
    return max(0.0, (1.0 - progress) / (1.0 - warmup_ratio))


def pretrain(
    cfg: PretrainConfig,
    output_dir: str | Path | None = None,
    *,
    force: bool = False,
    show_progress: bool | None = None,
    console: Any = None,
) -> PretrainOutcome:
    """Run `cfg` to a completed run directory with a model in it; resume an unfinished one; return a completed one
    as it is (unless `force`, which starts over)."""
    if output_dir is not None:  # config.yaml records where the run really is (output_dir is not its identity)
        require_nameable(output_dir, "--output-dir")
        cfg = cfg.model_copy(update={"output_dir": str(output_dir)})
    directory = run_directory(cfg, output_dir).resolve()
    # raises if the directory holds another config that trained, unless --force replaces it
    state = existing_state(cfg, directory, parse_pretrain_config, force=force)
    if state == "completed" and not force:
        return PretrainOutcome(directory, read_summary(directory) or {}, skipped=True)
    restore_environment = configure_environment(cfg)
    note_hub_use(cfg, console)
    try:
        return _Pretrain(cfg, directory, resume=state == "incomplete" and not force).run(show_progress, console)
    finally:
        restore_environment()
        release_run_lock(directory)


def _check_paths(cfg: PretrainConfig) -> None:
    if problems := check_pretrain_paths(cfg):
        raise ConfigError(f"{len(problems)} problem(s) with the files this config names:", problems)


class _Pretrain:
    """Setup (nothing written until it succeeded), then `run`."""

    def __init__(self, cfg: PretrainConfig, directory: Path, resume: bool) -> None:
        from transformers import set_seed

        _check_paths(cfg)
        check_writable(directory)
        self.cfg, self.directory = cfg, directory
        self.device = resolve_device(cfg)
        self.precision, self.autocast = autocast_for(cfg, self.device)
        self.tokenizer = build_tokenizer(cfg.model)
        self.masker = Masker(self.tokenizer, cfg.mlm)
        self.texts = load_texts(cfg, self.tokenizer)
        set_seed(cfg.seed)  # before the model is built: a random init depends on the seed only
        model = build_masked_lm(cfg)
        check_vocab_size(self.tokenizer, model)
        self.model = model.to(self.device)
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.order = BatchOrder([len(s) for s in self.texts.train], cfg.batch_size, cfg.seed, cfg.data.length_grouped)
        self.heldout = self._heldout_batches()
        self.resume = resume
        self.saved: dict[str, Any] | None = None

    def _heldout_batches(self) -> list[MlmBatch]:
        """Held-out texts sorted by length (little padding), masked once with a fixed seed: every evaluation, and
        every run on the same text, scores the same targets."""
        texts = sorted(self.texts.heldout, key=len)
        size, batches = self.cfg.eval.batch_size, []
        for i, start in enumerate(range(0, len(texts), size)):
            ids, attention = pad(texts[start : start + size], self.tokenizer.pad_token_id or 0)
            inputs, labels = self.masker(ids, attention, generator_for(HELDOUT_SEED, "heldout", i))
            batches.append(MlmBatch(inputs, attention, labels))
        return batches

    def batch(self, number: int) -> MlmBatch:
        """Batch `number` of the run (counted over micro-batches), masked: a function of (seed, number) only."""
        texts = [self.texts.train[i] for i in self.order.indices(number)]
        ids, attention = pad(texts, self.tokenizer.pad_token_id or 0)
        inputs, labels = self.masker(ids, attention, generator_for(self.cfg.seed, "mask", number))
        return MlmBatch(inputs, attention, labels)

    # ----------------------------------------------------------------------------------------------
    # The run directory

    def _start(self) -> dict[str, Any]:
        cfg, directory = self.cfg, self.directory
        if self.resume:
            acquire_run_lock(directory)  # first: the checkpoint is read only while no other process writes it
            self.saved = read_checkpoint_state(directory)
        if self.saved is not None:
            load_checkpoint(directory, self.model, self.optimizer)
            step = self.saved["step"]
            # Lines written after the checkpoint are written again by the resumed steps: keep one copy.
            kept = [r for r in read_jsonl(directory / "metrics.jsonl") if r.get("step", 0) <= step]
            atomic_write_text(directory / "metrics.jsonl", "".join(_json_line(r) for r in kept))
            summary = read_summary(directory) or {}
            summary.update(status="running", resumed_at_steps=[*summary.get("resumed_at_steps", []), step])
            for key in ("error", "failed_step", "interrupted_step"):
                summary.pop(key, None)
        else:
            start_run(cfg, directory)
            for stale in (CHECKPOINT, MODEL):
                shutil.rmtree(directory / stale, ignore_errors=True)
            summary = {"started_at": utc_now()}
        summary.update(
            experiment=cfg.experiment,
            source=cfg.source,
            seed=cfg.seed,
            device=torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else f"cpu ({os.cpu_count()} cores)",
            precision=self.precision,
            attn_implementation=self.model.config._attn_implementation,
            texts={
                "read": self.texts.read,
                "train": len(self.texts.train),
                "heldout": len(self.texts.heldout),
                "dropped_nothing_to_mask": self.texts.dropped,
            },
            mean_tokens_per_text=sum(map(len, self.texts.train)) / len(self.texts.train),
            batches_per_epoch=len(self.order),
            parameters=sum(p.numel() for p in self.model.parameters()),
            versions=library_versions(),
            git_commit=git_commit(),
        )
        atomic_write_json(directory / "summary.json", summary)
        return summary

    def _save_output(self) -> None:
        def fill(tmp: Path) -> None:
            self.model.save_pretrained(tmp, safe_serialization=True)
            self.tokenizer.save_pretrained(tmp)

        replace_directory(self.directory / MODEL, fill)

    # ----------------------------------------------------------------------------------------------
    # The loop

    def elapsed(self) -> float:
        """Seconds of this pretrain so far, over every session (the time budget's clock)."""
        return self.elapsed_before + time.perf_counter() - self.session_start

    def budget_used(self) -> float:
        """The share of the budget spent: steps or time, whichever is further."""
        cfg = self.cfg
        shares = [self.step / cfg.max_steps] if cfg.max_steps else []
        return max(shares + ([self.elapsed() / (60 * cfg.max_minutes)] if cfg.max_minutes else []))

    def _checkpoint(self) -> None:
        state = {"step": self.step, "elapsed_s": self.elapsed(), **self.counters}
        save_checkpoint(self.directory, self.model, self.optimizer, state)
        self.last_checkpoint = time.perf_counter()

    def _accumulate(self, window: _Window) -> float:
        """The gradients of one optimizer step over grad_accum_steps micro-batches: of the mean loss over all the
        window's targets, however they split (each micro-batch's mean weighs its share of the targets). Returns
        that mean."""
        accum = self.cfg.optim.grad_accum_steps
        numbers = [self.step * accum + micro for micro in range(accum)]
        batches = [self.batch(number) for number in numbers]
        targets = sum(int((b.labels != IGNORE).sum()) for b in batches)
        total = 0.0
        for number, batch in zip(numbers, batches, strict=True):
            batch = batch.to(self.device)
            torch.manual_seed(derived_seed(self.cfg.seed, "dropout", number))  # dropout too is a function of number
            result = mlm_loss(self.model, batch, self.autocast)
            (result.loss * (result.targets / targets)).backward()
            loss = float(result.loss.detach())  # a CPU-GPU sync point, once per micro-batch
            if not math.isfinite(loss):
                raise NonFiniteError(self.step + 1, "loss")
            total += loss * result.targets / targets
            window.add(loss, result, batch.tokens)
            self.counters["tokens_seen"] += batch.tokens
            self.counters["targets_seen"] += result.targets
        return total

    def run(self, show_progress: bool | None, console: Any) -> PretrainOutcome:
        cfg, directory, model, optimizer = self.cfg, self.directory, self.model, self.optimizer
        summary = self._start()
        saved = self.saved or {}
        self.step = saved.get("step", 0)
        self.counters = {k: saved.get(k, 0) for k in ("tokens_seen", "targets_seen")}
        self.session_start, self.elapsed_before = time.perf_counter(), float(saved.get("elapsed_s", 0.0))
        self.last_checkpoint = time.perf_counter()
        tokens_before = self.counters["tokens_seen"]
        metrics = JsonlWriter(directory / "metrics.jsonl")
        name = f"pretrain {cfg.experiment}/{cfg.source}/seed-{cfg.seed}"
        progress = RunProgress(name, cfg.max_steps, None, show_progress, console, eval_name="held-out")
        last_eval: dict[str, Any] | None = None

        def evaluate() -> None:
            nonlocal last_eval
            result = evaluate_heldout(model, self.heldout, self.device, self.autocast)
            last_eval = {"type": "eval", "step": self.step, **result, "elapsed_s": self.elapsed()}
            metrics.write(last_eval)
            if self.step == 0:
                summary["heldout_initial"] = result
            progress.evaluated(result["masked_accuracy"])

        def done() -> bool:
            return bool(
                (cfg.max_steps and self.step >= cfg.max_steps)
                or (cfg.max_minutes and self.elapsed() >= 60 * cfg.max_minutes)
            )

        if cfg.model.compile:  # the encoder only: the head sees a different number of targets every batch
            mlm_parts(model)[0].compile(backend=cfg.model.compile_backend)
        window = _Window()
        try:
            with progress:
                if self.step == 0:
                    evaluate()
                model.train()
                while not done():
                    lr = cfg.optim.lr * lr_factor(self.budget_used(), cfg.optim.warmup_ratio, cfg.optim.schedule)
                    for group in optimizer.param_groups:
                        group["lr"] = lr
                    loss = self._accumulate(window)
                    max_norm = cfg.optim.max_grad_norm or math.inf
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
                    if not math.isfinite(grad_norm):
                        raise NonFiniteError(self.step + 1, "gradient norm")
                    # Weights, optimizer state, step and the step's records change together or not at all: an
                    # interrupt landing between the update and its log line checkpointed the step without the line,
                    # and the resumed run never wrote it.
                    with interrupts_deferred():
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        self.step += 1
                        step = self.step
                        progress.step(step, loss, lr)
                        if step % cfg.log_every_n_steps == 0:
                            record = {"type": "train", "step": step, "lr": lr, "grad_norm": grad_norm, **window.take()}
                            epoch = self.order.epoch_of(step * cfg.optim.grad_accum_steps - 1) + 1
                            metrics.write({**record, "epoch": epoch, "elapsed_s": self.elapsed()})
                            progress.log(record)
                        if step % cfg.eval.every_n_steps == 0:
                            evaluate()
                    since = time.perf_counter() - self.last_checkpoint
                    if step % cfg.checkpoint_every_n_steps == 0 or since >= 60 * cfg.checkpoint_every_minutes:
                        self._checkpoint()
                if last_eval is None or last_eval["step"] != self.step:
                    evaluate()
                self._save_output()
        except NonFiniteError as e:
            summary.update(status="failed", error=str(e), failed_step=e.step, failed_quantity=e.quantity)
            raise RunFailed(f"pretrain failed: {e} ({directory})") from None
        except torch.OutOfMemoryError:
            summary.update(status="failed", error="out of memory", failed_step=self.step + 1, advice=OOM_ADVICE)
            raise RunFailed(
                f"pretrain failed: out of memory at step {self.step + 1}: {OOM_ADVICE} ({directory})"
            ) from None
        except KeyboardInterrupt:
            summary.update(status="interrupted", interrupted_step=self.step)
            optimizer.zero_grad(set_to_none=True)  # a half-accumulated step is redone on resume, with the same batches
            self._checkpoint()  # a whole state (updates are never cut): the next run resumes from exactly here
            raise
        except BaseException as e:
            summary.update(status="failed", error=f"{type(e).__name__}: {e}", failed_step=self.step + 1)
            raise
        else:
            summary.update(status="completed", model_dir=str(directory / MODEL), heldout_final=last_eval)
        finally:
            metrics.close()
            session = time.perf_counter() - self.session_start
            summary.update(
                steps=self.step,
                elapsed_s=self.elapsed(),
                **self.counters,
                session_tokens_per_s=(self.counters["tokens_seen"] - tokens_before) / session if session > 0 else None,
                **peak_memory(self.device),
                finished_at=utc_now(),
            )
            atomic_write_json(directory / "summary.json", summary)
        shutil.rmtree(directory / CHECKPOINT, ignore_errors=True)  # the model is saved: nothing left to resume
        return PretrainOutcome(directory, summary)


class _Window:
    """Averages over the steps since the last log line (per target, as the held-out evaluation): loss, masked-token
    accuracy; and throughput."""

    def __init__(self) -> None:
        self.loss_sum = 0.0
        self.correct = self.targets = self.tokens = 0
        self.started = time.perf_counter()

    def add(self, loss: float, result: Any, tokens: int) -> None:
        self.loss_sum += loss * result.targets
        self.correct += result.correct
        self.targets += result.targets
        self.tokens += tokens

    def take(self) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.started, 1e-9)
        out = {
            "loss": self.loss_sum / max(self.targets, 1),
            "masked_accuracy": self.correct / max(self.targets, 1),
            "tokens_per_s": self.tokens / seconds,
        }
        self.__init__()
        return out


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


def _json_line(record: dict[str, Any]) -> str:
    import json

    return json.dumps(record, ensure_ascii=False) + "\n"
