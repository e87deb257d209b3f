"""Dev-set evaluation: accuracy and macro-F1."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader


def macro_f1(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> float:
    """Unweighted mean F1 over the classes present in labels or predictions (as sklearn's default)."""
    idx = labels * num_classes + predictions
    confusion = torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)
    tp = confusion.diag().double()
    support = confusion.sum(1).double()  # true count per class
    predicted = confusion.sum(0).double()
    present = (support + predicted) > 0
    f1 = torch.where(support + predicted > 0, 2 * tp / (support + predicted).clamp_min(1), torch.zeros_like(tp))
    return float(f1[present].mean()) if bool(present.any()) else 0.0


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device,
    num_classes: int,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> dict[str, float]:
    was_training = model.training
    model.eval()
    preds, golds, loss_sum = [], [], 0.0
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        labels = batch.pop("labels")
        with autocast():
            logits = model(**batch).logits.float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        preds.append(logits.argmax(-1).cpu())
        golds.append(labels.cpu())
    model.train(was_training)
    p, y = torch.cat(preds), torch.cat(golds)
    return {
        "accuracy": float((p == y).double().mean()),
        "macro_f1": macro_f1(p, y, num_classes),
        "loss": loss_sum / len(y),
        "examples": len(y),
    }
