"""The pretrain config: what text, which model, how to mask, how long. Blocks shared with the run config (`model`,
the optimizer's fields, device and precision) mean the same here, so a fine-tuning config's `model` block can be
pasted in as is."""

from __future__ import annotations

from pathlib import Path, PurePath
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from clue_adv.config import (
    MAX_SEED,
    ModelConfig,
    OptimConfig,
    directory_name,
    format_validation_errors,
    path_problem,
    read_merged,
)
from clue_adv.errors import ConfigError
from clue_adv.schema import StrictModel

# Top-level fields only a pretrain config has: `clue-adv validate` tells a pretrain config from a run config by them
# (every valid pretrain config has a budget).
PRETRAIN_ONLY_FIELDS = {"mlm", "max_steps", "max_minutes", "checkpoint_every_n_steps", "checkpoint_every_minutes"}
# File names of the splits pretraining must never read: their text would leak into the evaluation.
HELD_OUT_SPLITS = {"dev", "test", "validation", "eval"}


def _nameable(value: str | None) -> str | None:
    if value is not None and (problem := path_problem(value)):
        raise ValueError(problem)
    return value


class PretrainDataConfig(StrictModel):
    """The text to pretrain on: a task's training split (local CLUE JSON lines or the hub), or a local text file."""

    path: str | None = Field(
        None,
        description="Local directory with the task's CLUE JSON-lines files; only `train_file` is read (TNEWS: "
        "sentence and keywords; IFLYTEK: sentence). `{task}` is replaced by the task name. When neither this nor "
        "`text_file` is set, the hub's training split is used. Relative to the config file that names it.",
    )
    hub_name: str = Field("clue/clue", description="Hub dataset id, used when neither `path` nor `text_file` is set.")
    hub_config: str | None = Field(None, description="Hub dataset config; default: the task name.")
    train_file: str = Field(
        "train.json",
        description="Training file name inside `path`. Never a dev or test file: text seen in pretraining would leak "
        "into the evaluation.",
    )
    text_file: str | None = Field(
        None,
        description="A local UTF-8 text file, one text per line (blank lines skipped), instead of the task's data. "
        "Keep the task's dev and test text out of it. Relative to the config file that names it.",
    )
    max_texts: int | None = Field(None, gt=0, description="Keep only the first N texts.")
    heldout_fraction: float = Field(
        0.02,
        gt=0,
        le=0.5,
        description="Share of the texts held out (never trained on) for the MLM loss and masked-token accuracy in "
        "metrics.jsonl; at least one text. The same texts and masks for every seed, so curves compare across runs.",
    )
    length_grouped: bool = Field(
        True,
        description="Sort by length inside windows of 50 batches of a seeded shuffle: little padding per batch (MLM "
        "has no class balance to keep, so on by default).",
    )

    _paths_are_nameable = field_validator("path", "text_file", "train_file")(_nameable)

    @field_validator("train_file")
    @classmethod
    def _not_a_held_out_split(cls, v: str) -> str:
        if PurePath(v).stem.lower() in HELD_OUT_SPLITS:
            raise ValueError(f"{v!r} is an evaluation split; pretraining reads only training text")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> PretrainDataConfig:
        if self.path is not None and self.text_file is not None:
            raise ValueError("data.path and data.text_file both set: give one source of text")
        return self

    @property
    def is_local(self) -> bool:
        return self.path is not None or self.text_file is not None


class MaskingConfig(StrictModel):
    """BERT's masking (Devlin et al. 2019): choose 15% of each text's tokens (at least one; never [CLS], [SEP] or
    padding) as targets; replace 80% of them by [MASK], 10% by a random token, keep 10%."""

    probability: float = Field(
        0.15, gt=0, lt=1, description="Share of each text's tokens chosen as targets (rounded, at least one)."
    )
    replace_mask: float = Field(0.8, ge=0, le=1, description="Share of the targets replaced by [MASK].")
    replace_random: float = Field(
        0.1, ge=0, le=1, description="Share of the targets replaced by a random non-special token; the rest is kept."
    )

    @model_validator(mode="after")
    def _shares_add_up(self) -> MaskingConfig:
        if self.replace_mask + self.replace_random > 1:
            raise ValueError(
                f"mlm.replace_mask + mlm.replace_random is {self.replace_mask + self.replace_random:g}; at most 1"
            )
        return self


class PretrainOptimConfig(OptimConfig):
    """The run config's optimizer block, with pretraining's defaults."""

    lr: float = Field(
        1e-4,
        gt=0,
        description="Peak learning rate. 1e-4, BERT's pretraining rate (continued pretraining of bert-base: 1e-4 to "
        "5e-5); a small random-init model takes about 1e-3.",
    )
    warmup_ratio: float = Field(
        0.06,
        ge=0,
        le=1,
        description="Share of the budget (steps, or time with a time budget) spent warming up from lr 0. 0.06, "
        "RoBERTa's and Gururangan et al.'s task-adaptive pretraining.",
    )
    grad_accum_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimizer step, each weighted by its share of the step's targets: the gradient "
        "of the mean MLM loss over all of them, as one batch of batch_size × grad_accum_steps texts.",
    )


class PretrainEvalConfig(StrictModel):
    every_n_steps: int = Field(200, gt=0, description="Evaluate on the held-out texts every N steps (and at the end).")
    batch_size: int = Field(256, gt=0, description="Held-out batch size (no gradients, so larger than training).")


class PretrainConfig(StrictModel):
    """One pretraining run: its text, a model, BERT's masking and a budget."""

    experiment: str = Field("pretrain", description="Experiment name: the first level under the output directory.")
    task: Literal["tnews", "iflytek"] | None = Field(
        None, description="CLUE task whose training text is read; may be left out with `data.text_file`."
    )
    seed: int = Field(1, ge=0, le=MAX_SEED, description="Seed for init, dropout, text order and masks.")
    data: PretrainDataConfig = Field(default_factory=PretrainDataConfig, description="The text.")
    model: ModelConfig = Field(
        default_factory=ModelConfig,
        description="Model and tokenizer, as in a run config (hub, local or random init with architecture "
        "overrides); a masked-LM head is added when the weights have none. `head` concerns classifiers only.",
    )
    mlm: MaskingConfig = Field(default_factory=MaskingConfig, description="Masking.")
    max_length: int = Field(
        128, gt=0, description="Truncate texts to this many tokens; batches are padded to their longest text."
    )
    batch_size: int = Field(64, gt=0, description="Texts per micro-batch.")
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps.")
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="Stop after this many minutes of pretraining (evaluations and checkpoints included, summed over "
        "resumed sessions). With a time budget the learning rate follows the share of the budget used (steps or "
        "time, whichever is further), so it decays to 0 when the time is up.",
    )
    optim: PretrainOptimConfig = Field(default_factory=PretrainOptimConfig, description="Optimizer and schedule.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="`auto`: bf16 autocast on a GPU that supports it, fp32 otherwise."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: CUDA when available.")
    eval: PretrainEvalConfig = Field(default_factory=PretrainEvalConfig, description="Held-out evaluation.")
    log_every_n_steps: int = Field(10, gt=0, description="Write a metrics.jsonl line every N optimizer steps.")
    checkpoint_every_n_steps: int = Field(
        500, gt=0, description="Save a checkpoint (model, optimizer, step) every N steps, to resume after a kill."
    )
    checkpoint_every_minutes: float = Field(
        5.0, gt=0, description="Also save one when this many minutes passed since the last (Ctrl-C saves one too)."
    )
    output_dir: str = Field(
        "results", description="Root of the run directories; relative to the current directory, in a config file too."
    )

    _experiment_is_a_name = field_validator("experiment")(directory_name)
    _output_is_nameable = field_validator("output_dir")(_nameable)

    @model_validator(mode="after")
    def _consistent(self) -> PretrainConfig:
        problems = []
        if self.max_steps is None and self.max_minutes is None:
            problems.append("set a budget: max_steps, max_minutes, or both (whichever comes first ends the run)")
        if self.task is None and self.data.text_file is None:
            problems.append("task: required unless data.text_file names the text (valid: tnews, iflytek)")
        if self.model.head != "pooler":
            problems.append("model.head: concerns the classifier; a pretrain has none (leave it out)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def source(self) -> str:
        """The text's name in the run directory: the task, or `text` for a text file."""
        return "text" if self.data.text_file is not None else str(self.task)

    def resolved(self) -> dict[str, Any]:
        """Every field with its value, as written to config.yaml (the identity of a run)."""
        return self.model_dump(mode="json")


def is_pretrain_config(data: dict[str, Any]) -> bool:
    return bool(PRETRAIN_ONLY_FIELDS & set(data))


def parse_pretrain_config(data: dict[str, Any], source: str = "pretrain config") -> PretrainConfig:
    try:
        return PretrainConfig.model_validate(data)
    except ValidationError as e:
        problems = format_validation_errors(e, PretrainConfig)
        raise ConfigError(f"{source}: {len(problems)} problem(s)", problems) from None


def load_pretrain_config(paths: str | Path | list[str | Path], overrides: list[str] | None = None) -> PretrainConfig:
    """Read and merge YAML config(s), apply `--set` overrides (as `load_config` does), validate; a ConfigError names
    every problem."""
    data, source = read_merged(paths, overrides)
    return parse_pretrain_config(data, source=source)


def run_directory(cfg: PretrainConfig, output_dir: str | Path | None = None) -> Path:
    """<output_dir>/<experiment>/<task or text>/mlm-seed-<k>: beside fine-tuning runs, but not a `seed-<k>` folder,
    so reports over the same output folder do not take it for a classification run."""
    root = Path(output_dir if output_dir is not None else cfg.output_dir).expanduser()
    return root / cfg.experiment / cfg.source / f"mlm-seed-{cfg.seed}"
