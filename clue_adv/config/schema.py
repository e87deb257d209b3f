"""The run configuration: one pydantic schema, the single source of truth for a run.

Defaults follow the CLUE benchmark's BERT-base baseline for these tasks (max length 128, batch 32,
AdamW lr 2e-5, 3 epochs, 10% warmup). The study's own protocol (Adam eps 1e-6, no warmup, no decay,
50 epochs, best dev epoch) lives in the `study` configs under configs/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import Field, field_validator, model_validator

from clue_adv.config.paths import directory_name, expandable
from clue_adv.diagnostics import DiagnosticsConfig
from clue_adv.regularizers import build_strategy, config_classes
from clue_adv.regularizers.none import NoneConfig
from clue_adv.schema import StrictModel

TASKS: dict[str, int] = {"tnews": 15, "iflytek": 119}  # task -> number of labels
MAX_SEED = 2**32 - 1  # numpy's and torch's seeding accept 0 .. 2**32 - 1

# A discriminated union over every registered strategy: `strategy.name` selects the block's schema.
StrategyBlock = Annotated[Union[config_classes()], Field(discriminator="name")]  # noqa: UP007 - dynamic members


class DataConfig(StrictModel):
    """Where the CLUE data comes from: a local directory of JSON-lines files, or the hub's `clue` dataset."""

    path: str | None = Field(
        None,
        description="Local directory with CLUE JSON-lines files (train.json, dev.json, labels.json). "
        "When set, the hub is not used. `{task}` is replaced by the task name (e.g. clue_adv/assets/{task}). "
        "Relative to the config file that names it (to the current directory in `--set`).",
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

    _path_expands = field_validator("path", "train_file", "dev_file")(expandable)

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
        "bert-base-chinese",
        description="Hub model name or local directory (config.json, weights, tokenizer). A directory is relative to "
        "the config file that names it (to the current directory in `--set`); write it as a path (`./model`, "
        "`../models/x`) unless it exists there, or it is read as a hub id.",
    )
    init: Literal["pretrained", "random"] = Field(
        "pretrained",
        description="`pretrained`: load the weights; `random`: build from config.json (+ `architecture`) with "
        "random init, which needs no weights (tests, benchmarks, offline smoke runs).",
    )
    architecture: ArchitectureConfig = Field(
        default_factory=ArchitectureConfig, description="Overrides for a smaller model; only with init=random."
    )
    tokenizer: str | None = Field(
        None, description="Tokenizer name or directory (relative as `name_or_path`); default: `name_or_path`."
    )
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

    _paths_expand = field_validator("name_or_path", "tokenizer")(expandable)

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
    output_dir: str = Field(
        "results",
        description="Root of the run directories; relative to the current directory, in a config file too (runs are "
        "written where the command runs).",
    )

    _output_expands = field_validator("output_dir")(expandable)

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
