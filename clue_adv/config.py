"""The run configuration: one pydantic schema, the single source of truth for a run.

Defaults follow the CLUE benchmark's BERT-base baseline for these tasks (max length 128, batch 32,
AdamW lr 2e-5, 3 epochs, 10% warmup). The study's own protocol (Adam eps 1e-6, no warmup, no decay,
50 epochs, best dev epoch) lives in the `study` configs under configs/.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from clue_adv.diagnostics import DiagnosticsConfig
from clue_adv.errors import ConfigError
from clue_adv.regularizers import build_strategy, config_classes, registry
from clue_adv.regularizers.none import NoneConfig
from clue_adv.schema import StrictModel

# The same pattern as StrategyConfig.tag: run directory names that are safe on every filesystem.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.=+-]*")

TASKS: dict[str, int] = {"tnews": 15, "iflytek": 119}  # task -> number of labels
MAX_SEED = 2**32 - 1  # numpy's and torch's seeding accept 0 .. 2**32 - 1


NAME_MAX = 255  # bytes per path component on Linux/macOS filesystems; a longer one makes every stat() raise


def path_problem(value: str, expands: bool = True) -> str | None:
    """Why `value` cannot name a file at all (a component over NAME_MAX bytes; with `expands`, a `~user` naming
    no user), or None. Either would make every later exists()/is_dir() raise instead of answering."""
    # surrogateescape: a name from argv may hold bytes that are not UTF-8 (a str of lone surrogates)
    if "\0" in value:
        return "contains a NUL byte"
    if any(len(part.encode("utf-8", "surrogateescape")) > NAME_MAX for part in value.split("/")):
        return f"a path component is longer than {NAME_MAX} bytes"
    if expands and value.startswith("~"):
        try:
            Path(value).expanduser()
        except RuntimeError:
            return f"{value.split('/', 1)[0]!r}: no such user (home directory unknown)"
    return None


def expand_path(value: str | Path) -> Path | None:
    """expanduser(), or None for a path no file can have (see path_problem): asking the filesystem about it
    would raise."""
    if path_problem(str(value)):
        return None
    return Path(value).expanduser()


def require_nameable(path: str | Path, what: str, expands: bool = True) -> None:
    """Raise a ConfigError naming `what` (e.g. `--output-dir`) when no file can have the name `path`."""
    if problem := path_problem(str(path), expands):
        shown = str(path) if len(str(path)) <= 80 else str(path)[:80] + "..."
        raise ConfigError(f"{what} {shown}: {problem}")


def directory_name(value: str) -> str:
    """An experiment name, which becomes a directory. Raises ValueError unless it is a plain name: a whitelist (the
    one strategy `tag` uses) keeps a run inside its output directory and rejects what a blacklist misses (NUL bytes,
    control characters, ':' on Windows)."""
    if len(value) > 80 or not _SAFE_NAME.fullmatch(value):
        raise ValueError(
            "must be a plain name of at most 80 characters: letters, digits and '_.=+-', "
            "starting with a letter or digit"
        )
    return value


def _expandable(value: str | None) -> str | None:
    """A path field is refused here when no file could have its name (see path_problem)."""
    if value is not None and (problem := path_problem(value)):
        raise ValueError(problem)
    return value


# A discriminated union over every registered strategy: `strategy.name` selects the block's schema.
StrategyBlock = Annotated[Union[config_classes()], Field(discriminator="name")]  # noqa: UP007 - dynamic members


class DataConfig(StrictModel):
    """Where the CLUE data comes from: a local directory of JSON-lines files, or the hub's `clue` dataset."""

    path: str | None = Field(
        None,
        description="Local directory with CLUE JSON-lines files (train.json, dev.json, labels.json). "
        "When set, the hub is not used. `{task}` is replaced by the task name (e.g. clue_adv/assets/{task}).",
    )
    hub_name: str = Field(
        "clue/clue", description="Hub dataset id (CLUE in parquet, formerly `clue`), used when `path` is not set."
    )
    hub_config: str | None = Field(None, description="Hub dataset config; default: the task name.")
    train_file: str = Field("train.json", description="Training file name inside `path`.")
    dev_file: str = Field("dev.json", description="Dev (evaluation) file name inside `path`.")
    max_train_samples: int | None = Field(None, gt=0, description="Keep only the first N training records.")
    max_eval_samples: int | None = Field(
        None, gt=0, description="Keep only the first N records of the evaluated split (dev, or the holdout)."
    )
    holdout_size: int = Field(
        0,
        ge=0,
        description="Carve this many examples out of the training file (a random subset drawn with holdout_seed from "
        "the whole file, before max_train_samples) into a held-out split that is never trained on. Choosing "
        "hyperparameters on it (`eval_split: holdout`) and reporting on dev keeps the dev score free of selection.",
    )
    holdout_seed: int = Field(
        0,
        ge=0,
        le=MAX_SEED,
        description="Seed of the holdout carve, separate from the run's seed so that every run of a comparison (every "
        "strategy and seed) holds out the same examples.",
    )
    eval_split: Literal["dev", "holdout"] = Field(
        "dev",
        description="What the run evaluates after each epoch (best epoch, early stopping, the report): the dev file, "
        "or the held-out part of the training file (needs holdout_size > 0).",
    )
    length_grouped: bool = Field(
        False,
        description="Shuffle, then sort by length inside windows of 50 batches: less padding per batch "
        "(faster, like HF's group_by_length) at the price of slightly less random batches.",
    )

    _path_expands = field_validator("path", "train_file", "dev_file")(_expandable)

    @model_validator(mode="after")
    def _holdout_to_evaluate(self) -> DataConfig:
        if self.eval_split == "holdout" and self.holdout_size == 0:
            raise ValueError(
                "eval_split: 'holdout' needs data.holdout_size > 0 (how many training examples to hold out)"
            )
        return self

    @property
    def is_local(self) -> bool:
        return self.path is not None

    def local_dir(self, task: str) -> Path:
        if self.path is None:
            raise ValueError("data.path is not set")
        return Path(self.path.replace("{task}", task)).expanduser()


class ArchitectureConfig(StrictModel):
    """Overrides of the model's config.json, to build a tiny BERT with the same vocabulary."""

    num_hidden_layers: int | None = Field(None, gt=0, description="Transformer layers (bert-base: 12).")
    hidden_size: int | None = Field(None, gt=0, description="Hidden size (bert-base: 768).")
    num_attention_heads: int | None = Field(None, gt=0, description="Attention heads (bert-base: 12).")
    intermediate_size: int | None = Field(None, gt=0, description="Feed-forward size (bert-base: 3072).")
    hidden_dropout_prob: float | None = Field(None, ge=0, lt=1, description="Dropout on hidden states (0.1).")
    attention_probs_dropout_prob: float | None = Field(None, ge=0, lt=1, description="Dropout on attention (0.1).")

    def overrides(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> ArchitectureConfig:
        # transformers raises only when the model is built, after tokenizing; the sizes are known now
        h, n = self.hidden_size, self.num_attention_heads
        if h is not None and n is not None and h % n:
            raise ValueError(f"hidden_size {h} is not a multiple of num_attention_heads {n}")
        return self


class ModelConfig(StrictModel):
    name_or_path: str = Field(
        "bert-base-chinese", description="Hub model name or local directory (config.json, weights, tokenizer)."
    )
    init: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="`pretrained`: load the weights; `random`: build from config.json (+ `architecture`) with "
        "random init, which needs no weights (tests, benchmarks, offline smoke runs).",
    )
    architecture: ArchitectureConfig = Field(
        default_factory=ArchitectureConfig, description="Overrides for a smaller model; only with init=random."
    )
    tokenizer: str | None = Field(None, description="Tokenizer name or directory; default: `name_or_path`.")
    head: Literal["pooler", "cls"] = Field(
        "pooler",
        description="`pooler`: HF's BertForSequenceClassification (tanh pooler, dropout, dense). `cls`: one dense "
        "softmax layer on the [CLS] vector, no pooler and no extra dropout (the study's bert4keras code).",
    )
    attn_implementation: Literal["auto", "eager", "sdpa"] = Field(
        "auto",
        description="`auto`: SDPA, or eager attention when the strategy needs a double backward "
        "(fused SDPA kernels have none).",
    )
    compile: bool = Field(
        False,
        description="Compile the model's forward with torch.compile (in place: parameters, saving and the strategies' "
        "access to the embeddings are unchanged). No double backward under torch.compile, so strategies that need one "
        "are refused; `gradient_penalty` with `mode: finite_difference` is the penalty that compiles.",
    )
    compile_backend: str = Field(
        "inductor",
        description="torch.compile backend: `inductor` (fused kernels; needs a C++ compiler on CPU), `aot_eager` "
        "(traces forward and backward without generating code: quick to compile, what the tests use).",
    )
    ignore_mismatched_sizes: bool = Field(
        False,
        description="Start a new classification head when the checkpoint's has another number of labels (e.g. a "
        "model fine-tuned on another task). Off by default so that a wrong checkpoint is an error, not a silent "
        "re-initialisation (Hugging Face's run_glue has the same switch).",
    )

    _paths_expand = field_validator("name_or_path", "tokenizer")(_expandable)

    @field_validator("compile_backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v in ("inductor", "aot_eager", "eager", "cudagraphs"):  # the usual ones, without importing dynamo
            return v
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if v not in known:
            raise ValueError(f"unknown torch.compile backend {v!r} (e.g. inductor, aot_eager)")
        return v

    @model_validator(mode="after")
    def _architecture_needs_random_init(self) -> ModelConfig:
        if self.init == "pretrained" and self.architecture.overrides():
            raise ValueError("model.architecture overrides need model.init: random (pretrained weights fix the shape)")
        return self


class OptimConfig(StrictModel):
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (CLUE BERT-base baseline and the study: 2e-5).")
    weight_decay: float = Field(
        0.01,
        ge=0,
        description="AdamW decoupled weight decay. 0.01, BERT's pre-training and fine-tuning default (Devlin et al.); "
        "never applied to biases and LayerNorm weights, as BERT does.",
    )
    betas: tuple[float, float] = Field(
        (0.9, 0.999), description="Adam betas. (0.9, 0.999), Adam's defaults (Kingma & Ba), which BERT also uses."
    )
    eps: float = Field(
        1e-6,
        gt=0,
        description="Adam epsilon. 1e-6, BERT's fine-tuning optimizer (Google's run_classifier, which CLUE's "
        "baselines use) and the study's bert4keras code; torch's own default is 1e-8.",
    )
    schedule: Literal["linear", "constant"] = Field(
        "linear", description="`linear`: warmup then linear decay to 0 (CLUE baseline); `constant`: after warmup."
    )
    warmup_ratio: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Fraction of optimizer steps spent warming up from lr 0. 0.1, BERT's `warmup_proportion` "
        "(Devlin et al.) and the CLUE baselines': early full-size updates can wreck the pretrained weights.",
    )
    max_grad_norm: float | None = Field(
        1.0,
        gt=0,
        description="Clip the global gradient norm; null disables. 1.0, BERT's optimizer code (clip_by_global_norm) "
        "and the Hugging Face Trainer default: one outlier batch cannot throw the weights far.",
    )
    grad_accum_steps: int = Field(
        1,
        ge=1,
        description="Micro-batches per optimizer step, each weighted by its share of the step's examples: the "
        "objective, gradient penalties included, is that of one batch of batch_size × grad_accum_steps "
        "(`clue-adv strategies NAME` says where a split changes it, e.g. `target: embedding_matrix`).",
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("each beta must be in [0, 1)")
        return v


class EarlyStoppingConfig(StrictModel):
    """Stop when dev accuracy (the metric that picks the best epoch) stops improving, as Keras' and the HF
    Trainer's early stopping do."""

    patience: int = Field(
        gt=0, description="Stop after this many evaluations in a row without an improvement of dev accuracy."
    )
    min_delta: float = Field(
        0.0,
        ge=0,
        description="An improvement must beat the reference accuracy by more than this (absolute: 0.001 = 0.1 "
        "point); the reference moves only on such an improvement.",
    )


class EvalConfig(StrictModel):
    every_n_steps: int | None = Field(None, gt=0, description="Also evaluate every N optimizer steps.")
    batch_size: int = Field(128, gt=0, description="Dev batch size (no gradients, so larger than training).")
    early_stopping: EarlyStoppingConfig | None = Field(
        None,
        description="Stop training early when dev accuracy stops improving (checked at every evaluation, mid-epoch "
        "ones too); the run is `completed`, with `stopped_early_at_epoch` in summary.json. null (the default, and "
        "the CLUE and study protocols): train every epoch.",
    )


class CheckpointConfig(StrictModel):
    """Resumable checkpoints in the run directory. Not part of the run's identity: turning them on for a run that
    was interrupted without them is the same run."""

    every_epoch: bool = Field(
        False,
        description="At every epoch's end, replace `checkpoint/` in the run directory with the model (safetensors), "
        "optimizer, scheduler, strategy and RNG/data-order state and the loop's bookkeeping (best epoch, history): "
        "an interrupted or failed run with the same config then resumes after its last finished epoch and ends "
        "exactly as an uninterrupted run would (`--force` starts over). Deleted when the run completes. Costs a "
        "write of about 3x the model's size per epoch; worth it for long runs (the study's 50 epochs).",
    )


class LoggingConfig(StrictModel):
    """Where a run's metrics go besides metrics.jsonl (which the report reads). Not part of the run's identity:
    turning a tracker on for an interrupted run resumes the same run."""

    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list,
        description="Experiment trackers that receive every metrics.jsonl record, its numeric fields as scalars named "
        "`<type>/<field>` (`train/loss`, `eval/accuracy`) at its step; one tracker run per run directory, grouped by "
        "the experiment. `tensorboard`: event files in `<run>/tensorboard/`; `wandb`: project $WANDB_PROJECT "
        "(default clue-adv), group = experiment, files in `<run>/wandb/` (WANDB_MODE, e.g. offline, is yours); "
        "`mlflow`: MLflow experiment = experiment, at MLFLOW_TRACKING_URI, else in the SQLite store "
        "`<output_dir>/mlflow.db` shared by the runs of that output directory (`mlflow ui --backend-store-uri "
        "sqlite:///<output_dir>/mlflow.db`). Each needs its package: pip install 'clue-adv[tensorboard]' (or [wandb], "
        "[mlflow]).",
    )

    @field_validator("trackers")
    @classmethod
    def _each_once(cls, v: list[str]) -> list[str]:
        twice = sorted({name for name in v if v.count(name) > 1})
        if twice:
            raise ValueError(f"listed more than once: {', '.join(twice)}")
        return v


class RunConfig(StrictModel):
    """One training run: a task, a model, a strategy, a seed."""

    experiment: str = Field("default", description="Experiment name: the first level under the output directory.")
    task: Literal["tnews", "iflytek"] = Field(description="CLUE task.")
    seed: int = Field(
        1,
        ge=0,
        le=MAX_SEED,
        description="Seed for init, dropout and data order (paired across strategies: one seed gives every strategy "
        "the same init and batches). 1, because sweeps number their seeds 1..N: a single run is a sweep's first seed.",
    )
    data: DataConfig = Field(default_factory=DataConfig, description="Data source.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Model and tokenizer.")
    strategy: StrategyBlock = Field(default_factory=NoneConfig, description="Training strategy (regularizer).")
    max_length: int = Field(128, gt=0, description="Truncate inputs to this many tokens (the study: 128).")
    batch_size: int = Field(32, gt=0, description="Training micro-batch size (the study and CLUE: 32).")
    epochs: int = Field(3, gt=0, description="Training epochs (CLUE baseline: 3; the study: 50, best epoch).")
    optim: OptimConfig = Field(default_factory=OptimConfig, description="Optimizer and schedule.")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Label smoothing in the cross-entropy.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="`auto`: bf16 autocast on a GPU that supports it, fp32 otherwise."
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="`auto`: CUDA when available.")
    deterministic: bool = Field(
        False,
        description="PyTorch's deterministic algorithms, cuDNN's deterministic kernels and a fixed cuBLAS workspace "
        "(CUBLAS_WORKSPACE_CONFIG): the same run gives the same numbers twice on one GPU, more slowly. An operation "
        "without a deterministic implementation warns instead of failing the run. Off: the fastest kernels.",
    )
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation on dev.")
    diagnostics: DiagnosticsConfig = Field(
        default_factory=DiagnosticsConfig,
        description="Input-gradient norm, input curvature, accuracy under attack, generalisation gap "
        "(docs/DIAGNOSTICS.md).",
    )
    log_every_n_steps: int = Field(
        10,
        gt=0,
        description="Write a metrics.jsonl line (losses averaged over the N steps) every N optimizer steps. 10: about "
        "170 lines per TNEWS epoch at batch 32, enough for loss curves without a file write every step.",
    )
    logging: LoggingConfig = Field(
        default_factory=LoggingConfig,
        description="Experiment trackers (TensorBoard, Weights & Biases, MLflow); not part of the run's identity.",
    )
    save_model: bool = Field(False, description="Save the best-dev model (safetensors) in the run directory.")
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Resumable checkpoints (not part of the run's identity)."
    )
    output_dir: str = Field("results", description="Root of the run directories.")

    _output_expands = field_validator("output_dir")(_expandable)

    _experiment_is_a_name = field_validator("experiment")(directory_name)

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if build_strategy(self.strategy).needs_double_backward and self.model.attn_implementation == "sdpa":
            raise ValueError(
                f"model.attn_implementation: 'sdpa' cannot run strategy '{self.strategy.name}', which differentiates "
                "a gradient (double backward) that fused SDPA attention kernels do not have: use auto or eager"
            )
        if build_strategy(self.strategy).needs_double_backward and self.model.compile:
            raise ValueError(
                f"model.compile: torch.compile has no double backward, which strategy '{self.strategy.name}' needs; "
                "set model.compile: false, or use gradient_penalty with mode: finite_difference"
            )
        return self

    @property
    def num_labels(self) -> int:
        return TASKS[self.task]

    def resolved(self) -> dict[str, Any]:
        """Every field with its value, as written to config.yaml (the identity of a run)."""
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------------
# Loading, overrides and error messages


def load_yaml(path: Path) -> dict[str, Any]:
    require_nameable(path, "config file", expands=False)  # a config path from the shell is already expanded
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    if not path.is_file() or not os.access(path, os.R_OK):
        raise ConfigError(f"config file is not a readable file: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not valid UTF-8 text (byte {e.start}); save the config as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: YAML error: {e}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `--set a.b.c=value` (value parsed as YAML, so 3e-5, true, [1, 2] work)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set optim.lr=3e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    set_dotted(data, key.strip(), value, what=f"--set {key.strip()}")


def set_dotted(data: dict[str, Any], key: str, value: Any, what: str | None = None) -> None:
    """Set `data["a"]["b"]["c"] = value` for key "a.b.c", creating blocks; `what` names the source in errors."""
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{what or key}: '{part}' is not a block of fields")
        node = child
    # a copy: one sweep value is set into many run configs, which must not share (and later mutate) it
    node[parts[-1]] = copy.deepcopy(value)


def merge_dotted(data: dict[str, Any], key: str, value: Any) -> dict[str, Any]:
    """`data` with {"a": {"b": value}} for key "a.b" deep-merged into it, as a config file with that block would be
    (`merge`): a sweep's `overrides: {data: {max_train_samples: 200}}` keeps the base's `data.path`. The value is
    copied: one sweep value goes into many run configs, which must not share (and later mutate) it."""
    nested: Any = copy.deepcopy(value)
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return merge(data, nested)


# `--set` keys whose value the run directory shows already (experiment, task, seed; a strategy's parameters in its
# directory name) or that do not change what a run computes (where it is written, checkpoints, trackers: not part of
# its identity, see rundir._NOT_IDENTITY): every other `--set` names a variant of the experiment.
_NOT_A_VARIANT = ("experiment", "task", "seed", "output_dir", "checkpoint", "logging", "strategy")
# Where the task's data is read from (a local copy of CLUE, or the hub) is not what a run computes: the same run
# read from another folder is the same run (rundir.identity leaves it out too).
_WHERE_DATA_IS = ("data.path",)
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.=+-]")


def format_value(value: Any) -> str:
    """A value as it appears in a directory name: `3e-05`, `true`, `[1,2]`; a character no directory name may hold
    (`/`, `{`, a space) becomes `_`."""
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, int | float | str):
        text = str(value)
    else:
        text = json.dumps(value, separators=(",", ":"), default=str)
    return _UNSAFE_CHARS.sub("_", text)


def variant_name(experiment: str, fields: list[tuple[str, Any]]) -> str:
    """The experiment folder of a variant: `experiment+key=value` per field, in order (`smoke+optim.lr=3e-05`).
    When that is longer than an experiment name may be, `experiment+v` and a hash of the fields instead (the full
    values are in each run's config.yaml)."""
    suffix = "".join(f"+{key}={format_value(value)}" for key, value in fields)
    if len(experiment + suffix) <= 80:
        return experiment + suffix
    digest = hashlib.sha1(json.dumps(fields, default=str).encode()).hexdigest()[:10]
    return f"{experiment[: 80 - 12]}+v{digest}"


def set_variant_fields(assignments: list[str], tagged: bool = False) -> list[tuple[str, Any]]:
    """The `--set` fields that make a run a variant of its experiment (see _NOT_A_VARIANT), as (key, parsed value),
    the last value of a key repeated. With `tagged` (the strategy names its directory by `strategy.tag`, which hides
    its parameters) the strategy's parameters count too."""
    fields: dict[str, Any] = {}
    for assignment in assignments:
        key, _, raw = assignment.partition("=")
        key = key.strip()
        head, _, rest = key.partition(".")
        strategy_param = tagged and head == "strategy" and rest not in ("", "name", "tag")
        if (head in _NOT_A_VARIANT and not strategy_param) or key in _WHERE_DATA_IS:
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        fields.pop(key, None)
        fields[key] = value
    return list(fields.items())


def as_variant(cfg: RunConfig, assignments: list[str]) -> RunConfig:
    """`cfg` in the experiment folder its `--set` fields name (variant_name): a run with `--set optim.lr=3e-5` is
    `<experiment>+optim.lr=3e-05/...`, never the folder of the run without it."""
    fields = set_variant_fields(assignments, tagged=cfg.strategy.tag is not None)
    if not fields:
        return cfg
    return cfg.model_copy(update={"experiment": variant_name(cfg.experiment, fields)})


def did_you_mean(word: str, names: list[str]) -> str:
    """A hint for a misspelt field or parameter: the closest of `names`, else all of them (nothing without names)."""
    close = difflib.get_close_matches(word, names, n=1)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (valid: {', '.join(names)})" if names else ""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def check_key(root: type[BaseModel], key: str) -> str | None:
    """None if `key` (dotted, as in `--set`) names a field of `root`, else a message with a 'did you mean'."""
    model: type[BaseModel] | None = root
    parts = key.split(".")
    for i, part in enumerate(parts):
        if model is None:
            return f"'{'.'.join(parts[:i])}' is not a block of fields"
        fields = model.model_fields
        if part not in fields:
            where = ".".join(parts[:i])
            return f"unknown field '{part}'" + (f" in '{where}'" if where else "") + did_you_mean(part, list(fields))
        model = _model_of(fields[part].annotation)
    return None


def _is_union_tag(loc: tuple[Any, ...], i: int) -> bool:
    """Whether `loc[i]` is the tag pydantic puts into the path of a strategy block: `strategy.<tag>.epsilon` in a
    run config, `strategies.<n>.<tag>.epsilon` in a sweep file. Users wrote no such level."""
    if i == 0 or loc[i] not in registry():
        return False
    return loc[i - 1] == "strategy" or (i > 1 and isinstance(loc[i - 1], int) and loc[i - 2] == "strategies")


def _field_names(root: type[StrictModel], loc: tuple[Any, ...]) -> list[str]:
    """Names valid at `loc`'s parent, for 'did you mean' hints."""
    model: type[StrictModel] | None = root
    for i, part in enumerate(loc[:-1]):
        if _is_union_tag(loc, i):
            model = registry()[part].config_class
            continue
        field = model.model_fields.get(str(part)) if model is not None else None
        ann = field.annotation if field is not None else None
        # an optional block (`X | None`, e.g. eval.early_stopping) names X's fields
        candidates = [ann, *typing.get_args(ann)]
        model = next((a for a in candidates if isinstance(a, type) and issubclass(a, StrictModel)), None)
    return list(model.model_fields) if model is not None else []


def format_validation_errors(err: ValidationError, root: type[StrictModel] = RunConfig) -> list[str]:
    """One readable line per problem: dotted field path, message, the offending value, a hint."""
    problems = []
    for e in err.errors():
        loc = tuple(e["loc"])
        bad_key = loc[-1:] == ("[key]",)  # a mapping's key failed (e.g. a sweep's `overrides` key): the path names it
        # pydantic puts the union tag into the path; drop it so users see the YAML path they wrote.
        shown = [str(p) for i, p in enumerate(loc[:-1] if bad_key else loc) if not _is_union_tag(loc, i)]
        path = ".".join(shown) or "(top level)"
        kind = e["type"]
        if kind == "extra_forbidden":
            problems.append(f"{path}: unknown field{did_you_mean(str(loc[-1]), _field_names(root, loc))}")
        elif kind == "union_tag_invalid":
            tag = e.get("ctx", {}).get("tag")
            problems.append(f"{path}.name: unknown strategy {tag!r}; valid: {', '.join(registry())}")
        elif kind == "union_tag_not_found":
            problems.append(f"{path}.name: missing; valid: {', '.join(registry())}")
        elif kind == "literal_error":
            problems.append(f"{path}: {e['msg']} (got {e.get('input')!r})")
        elif kind == "missing":
            problems.append(f"{path}: required field is missing")
        elif kind == "value_error" and not shown:
            # A whole-config check (model_validator) names its fields at the start of its own message.
            problems.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            got = e.get("input")
            shown_input = "" if bad_key or isinstance(got, dict) or repr(got) in str(e["msg"]) else f" (got {got!r})"
            message = str(e["msg"]).removeprefix("Value error, ")  # pydantic's prefix for our own ValueErrors
            problems.append(f"{path}: {message}{shown_input}")
    return problems


def parse_config(data: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        problems = format_validation_errors(e)
        raise ConfigError(f"{source}: {len(problems)} problem(s)", problems) from None


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` into `base` (later config files override earlier ones). A block whose `name`
    changes (e.g. another strategy) is replaced, not merged: the old strategy's fields would not fit."""
    out = dict(base)
    for key, value in update.items():
        old = out.get(key)
        if (
            isinstance(old, dict)
            and isinstance(value, dict)
            and old.get("name", value.get("name")) == value.get("name", old.get("name"))
        ):
            out[key] = merge(old, value)
        else:
            out[key] = value
    return out


def load_config(paths: str | Path | list[str | Path], overrides: list[str] | None = None) -> RunConfig:
    """Read YAML config(s) (merged in order), apply `--set` overrides, validate.
    Raises ConfigError naming every problem."""
    files = [Path(p) for p in (paths if isinstance(paths, list) else [paths])]
    data: dict[str, Any] = {}
    for path in files:
        data = merge(data, load_yaml(path))
    for assignment in overrides or []:
        apply_override(data, assignment)
    return parse_config(data, source=" + ".join(str(p) for p in files))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.resolved(), sort_keys=False, allow_unicode=True)
