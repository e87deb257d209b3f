"""The masked-LM model and its loss, with logits at the masked positions only.

Hugging Face's BertForMaskedLM computes logits over the whole vocabulary (21,128 tokens for bert-base-chinese) at
every position and then ignores all but the ~15% that are targets. Here the encoder runs as usual, its hidden states
at the targets are gathered, and only those go through the head (transform + decoder): the same numbers at the
targets, about 1/7 of the head's work and memory, which on a small model is most of the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from clue_adv.errors import ClueAdvError
from clue_adv.model import attention_for, load_model
from clue_adv.pretrain.masking import IGNORE

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from clue_adv.pretrain.config import PretrainConfig


def mlm_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(encoder, head) of a masked-LM model: BERT's `bert` + `cls`, or a RoBERTa-like `lm_head`."""
    encoder = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = getattr(model, "cls", None) or getattr(model, "lm_head", None)
    if not isinstance(encoder, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        raise ClueAdvError(
            f"model: pretraining needs a BERT-like masked-LM model (an encoder and a `cls` or `lm_head` head), "
            f"not {type(model).__name__}"
        )
    return encoder, head


def build_masked_lm(cfg: PretrainConfig) -> PreTrainedModel:
    """The masked-LM model from `cfg.model` (hub, local or random init), on the seed the caller has set."""
    from transformers import AutoModelForMaskedLM

    model = load_model(cfg.model, AutoModelForMaskedLM, attention_for(cfg.model, needs_double_backward=False))
    mlm_parts(model)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and cfg.max_length > positions:
        raise ClueAdvError(f"max_length {cfg.max_length} exceeds the model's {positions} positions")
    return model


def masked_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at the targets [N, vocab], the targets' tokens [N]), N = number of labels that are not IGNORE."""
    encoder, head = mlm_parts(model)
    hidden = encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
    targets = labels != IGNORE
    return head(hidden[targets]), labels[targets]


@dataclass
class MlmBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def to(self, device: torch.device) -> MlmBatch:
        return MlmBatch(*(t.to(device, non_blocking=True) for t in (self.input_ids, self.attention_mask, self.labels)))

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class MlmResult:
    loss: torch.Tensor  # mean cross-entropy over the batch's targets
    correct: int
    targets: int


def mlm_loss(
    model: torch.nn.Module,
    batch: MlmBatch,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> MlmResult:
    with autocast():
        logits, targets = masked_logits(model, batch.input_ids, batch.attention_mask, batch.labels)
    logits = logits.float()  # the softmax over 21k tokens in fp32 (bf16 autocast)
    loss = F.cross_entropy(logits, targets)
    correct = int((logits.detach().argmax(-1) == targets).sum())
    return MlmResult(loss, correct, int(targets.numel()))


@torch.no_grad()
def evaluate_heldout(
    model: torch.nn.Module,
    batches: Iterable[MlmBatch],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, float]:
    """MLM loss and masked-token accuracy over every target of the held-out batches (weighted by target)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for batch in batches:
        result = mlm_loss(model, batch.to(device), autocast)
        loss_sum += float(result.loss) * result.targets
        correct += result.correct
        count += result.targets
    model.train(was_training)
    return {"loss": loss_sum / count, "masked_accuracy": correct / count, "masked_tokens": count}
