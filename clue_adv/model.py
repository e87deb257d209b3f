"""Tokenizer and model: from the hub, a local directory, or random init from a config (+ overrides)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from clue_adv.config.paths import names_a_path
from clue_adv.errors import ClueAdvError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from clue_adv.config import ModelConfig, RunConfig
    from clue_adv.data import LabelSet

BERT_CHINESE_VOCAB = 21128
# Resolved from this file, so a hint that names it works from any working directory.
BUNDLED_TOKENIZER = Path(__file__).resolve().parent / "assets" / "tokenizer"


def looks_local(name_or_path: str) -> bool:
    """A path (or an existing directory) rather than a hub id like 'bert-base-chinese'."""
    return os.path.isdir(name_or_path) or names_a_path(name_or_path)


def _offline_hint(what: str, name: str, error: Exception, field: str = "model.name_or_path") -> ClueAdvError:
    # The hint must work from any working directory and keep the experiment: a relative path to the bundled
    # tokenizer, or a switch to random init, would silently change what is being measured.
    if looks_local(name):  # a local directory that does not load: the hub is not the problem, its files are
        advice = (
            "\nA model directory needs config.json, tokenizer files (vocab.txt, tokenizer_config.json) and, for "
            "init: pretrained, *.safetensors weights"
            if isinstance(error, OSError)
            else ""  # e.g. a ValueError from its config (hidden size vs heads): the message says what
        )
        return ClueAdvError(
            f"{field}: could not load {what} from the directory {name}: {type(error).__name__}: {error}{advice}"
        )
    return ClueAdvError(
        f"could not load {what} {name!r}: {type(error).__name__}: {error}\n"
        "Without the hub, point it at a local directory instead: download the model's config.json, tokenizer "
        "files (vocab.txt, tokenizer_config.json) and *.safetensors weights into a directory, then "
        f"--set {field}=/path/to/that/directory. "
        "(Only to smoke-test the pipeline, not the experiment: a random-init model on the bundled vocabulary, "
        f"--set model.name_or_path={BUNDLED_TOKENIZER} --set model.init=random.)"
    )


def check_safetensors(name: str) -> None:
    """Pretrained weights are read only from safetensors: a pickle (pytorch_model.bin) can run code on load."""
    path = Path(name).expanduser()
    if not path.is_dir() or any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return
    pickled = sorted(p.name for p in path.glob("*.bin"))
    found = f"it holds only {', '.join(pickled)}" if pickled else "it holds no weights"
    raise ClueAdvError(
        f"model.name_or_path: {name}: safetensors weights (model.safetensors) are required, {found}; "
        "pickled weights are never loaded. Convert them once where you trust the file, e.g. "
        "AutoModelForSequenceClassification.from_pretrained(dir).save_pretrained(dir) writes model.safetensors"
    )


def _check_local(name: str, field: str) -> None:
    if looks_local(name) and not Path(name).expanduser().is_dir():
        raise ClueAdvError(f"{field}: directory not found: {name}")


def build_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    name = cfg.tokenizer or cfg.name_or_path
    field = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    _check_local(name, field)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise _offline_hint("tokenizer", name, e, field) from None
    vocab_file = Path(name) / "vocab.txt"
    if vocab_file.is_file():
        # transformers 5 can silently build a 5-token vocabulary from a bad keyword; count the file's lines
        # ('\n' only: the vocabulary contains U+2028 as a token).
        expected = vocab_file.read_text(encoding="utf-8").rstrip("\n").count("\n") + 1
        if len(tokenizer) != expected:
            raise ClueAdvError(f"tokenizer from {name} has {len(tokenizer)} tokens but vocab.txt has {expected}")
    return tokenizer


def attention_for(cfg: ModelConfig, needs_double_backward: bool) -> str:
    """Fused SDPA kernels have no double backward; eager attention does."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    return "eager" if needs_double_backward else "sdpa"


def load_model(mc: ModelConfig, auto_class: Any, attn: str, **config_kwargs: Any) -> PreTrainedModel:
    """`auto_class` (e.g. AutoModelForMaskedLM) from `mc`: pretrained weights (safetensors only) or random init from
    the config (+ architecture overrides), on the seed already set by the caller. A RuntimeError about mismatched
    sizes passes through for the caller to explain."""
    from transformers import AutoConfig

    _check_local(mc.name_or_path, "model.name_or_path")
    try:
        config = AutoConfig.from_pretrained(mc.name_or_path, **config_kwargs, **mc.architecture.overrides())
        if mc.init == "random":
            return auto_class.from_config(config, attn_implementation=attn)
        check_safetensors(mc.name_or_path)
        return auto_class.from_pretrained(
            mc.name_or_path,
            config=config,
            attn_implementation=attn,
            ignore_mismatched_sizes=mc.ignore_mismatched_sizes,
            use_safetensors=True,
        )
    except (OSError, ValueError) as e:
        raise _offline_hint("model", mc.name_or_path, e) from None


def build_model(cfg: RunConfig, labels: LabelSet, needs_double_backward: bool) -> PreTrainedModel:
    """The classifier, on the seed already set by the caller (init must be reproducible)."""
    from transformers import AutoModelForSequenceClassification

    mc = cfg.model
    label_kwargs = {
        "num_labels": len(labels.ids),
        "id2label": {i: label for i, label in enumerate(labels.ids)},
        "label2id": {label: i for i, label in enumerate(labels.ids)},
    }
    try:
        model = load_model(
            mc, AutoModelForSequenceClassification, attention_for(mc, needs_double_backward), **label_kwargs
        )
    except RuntimeError as e:
        if "ignore_mismatched_sizes" not in str(e):
            raise
        # transformers raises this after printing a report; one line naming the fix is what a user needs.
        raise ClueAdvError(
            f"model.name_or_path: {mc.name_or_path} has weights of another shape than this {cfg.task} classifier "
            f"({len(labels.ids)} labels), e.g. a head fine-tuned on another task; set "
            "model.ignore_mismatched_sizes: true to start a new head"
        ) from None
    if mc.head == "cls":
        use_cls_vector(model)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and cfg.max_length > positions:
        raise ClueAdvError(f"max_length {cfg.max_length} exceeds the model's {positions} positions")
    return model


def check_vocab_size(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Token ids at or above the model's vocab_size would index past the embedding table (an IndexError deep in
    the forward pass on a CPU, a device-side assert on CUDA): a tokenizer with added tokens, or a model whose
    vocab_size was overridden smaller, fails here instead."""
    vocab_size = getattr(model.config, "vocab_size", None)
    if vocab_size is not None and len(tokenizer) < vocab_size // 2:
        # A model's vocab_size may be padded a little beyond its tokenizer, never to twice its size: this is a
        # tokenizer that did not load its vocabulary (transformers 5 can build a 5-token one without an error).
        raise ClueAdvError(
            f"the tokenizer has only {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}: it did not "
            "load the model's vocabulary; check model.tokenizer / the tokenizer files"
        )
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ClueAdvError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {vocab_size}: ids up to "
            f"{len(tokenizer) - 1} would index past the embedding; use the model's own tokenizer "
            "(model.tokenizer) or a model with a vocabulary at least as large"
        )


class _ClsVector(torch.nn.Module):
    """Stands in for BERT's pooler: the raw [CLS] hidden state, no dense layer, no tanh."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states[:, 0]


def use_cls_vector(model: torch.nn.Module) -> None:
    """Make the classifier one dense softmax layer on [CLS] (the study's head): drop pooler and dropout."""
    base = getattr(model, model.base_model_prefix, None)
    if base is None or getattr(base, "pooler", None) is None or not hasattr(model, "dropout"):
        raise ClueAdvError(f"model.head: cls is only supported for BERT-like models, not {type(model).__name__}")
    base.pooler = _ClsVector()
    model.dropout = torch.nn.Identity()


def model_max_positions(name_or_path: str) -> int | None:
    """max_position_embeddings from a local config.json, without building anything (for validation)."""
    path = Path(name_or_path).expanduser() / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):  # ValueError: bad JSON or not UTF-8; loading will say which
        return None
    positions = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return positions if isinstance(positions, int) and not isinstance(positions, bool) else None


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    return tuple(sorted(set(tokenizer.all_special_ids)))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (as BERT was trained and HF examples do)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "LayerNorm" in name or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
