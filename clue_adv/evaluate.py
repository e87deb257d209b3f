"""Dev-set evaluation: accuracy and macro-F1."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """counts[true, predicted], on the predictions' device (bincount without weights: deterministic on CUDA too)."""
    idx = labels * num_classes + predictions
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def macro_f1_of(confusion: list[list[float]]) -> float:
    """Unweighted mean F1 over the classes present in labels or predictions (as sklearn's default), from a confusion
    matrix read on the host: 2·tp / (true + predicted) per class."""
    n = len(confusion)
    f1 = []
    for c in range(n):
        true, predicted = sum(confusion[c]), sum(confusion[r][c] for r in range(n))
        if true + predicted > 0:
            f1.append(2 * confusion[c][c] / (true + predicted))
    return sum(f1) / len(f1) if f1 else 0.0


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: Iterable[dict[str, torch.Tensor]],
    device: torch.device,
    num_classes: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, float]:
    """Accuracy, macro-F1 and mean loss over `loader`. The confusion counts and the loss sum are kept on the device
    and read once at the end: on a GPU each read waits for the queued batches, and used to come once per batch."""
    was_training = model.training
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # float64: as a sum of float() reads was
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        labels = batch.pop("labels")
        with autocast():
            logits = model(**batch).logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        confusion += confusion_matrix(logits.argmax(-1), labels, num_classes)
    model.train(was_training)
    # one host read; counts are exact in float64 (below 2**53)
    *counts, loss = torch.cat([confusion.flatten().double(), loss_sum.reshape(1)]).tolist()
    matrix = [counts[r * num_classes : (r + 1) * num_classes] for r in range(num_classes)]
    examples = int(sum(counts))
    return {
        "accuracy": sum(matrix[c][c] for c in range(num_classes)) / examples,
        "macro_f1": macro_f1_of(matrix),
        "loss": loss / examples,
        "examples": examples,
    }
