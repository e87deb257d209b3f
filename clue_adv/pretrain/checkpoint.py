"""Checkpoints to resume a pretrain: model and optimizer state as safetensors, the counters as JSON. Nothing is
unpickled on load. The random state needs no saving: batches, masks and dropout are seeded by batch number.

    checkpoint/model.safetensors       the model's weights (tied weights stored once)
    checkpoint/optimizer.safetensors   AdamW's per-parameter state, keys `<parameter index>.<name>`
    checkpoint/state.json              step, elapsed time, tokens seen, ...
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from clue_adv.errors import ClueAdvError
from clue_adv.rundir import replace_directory

CHECKPOINT = "checkpoint"


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's state as flat named tensors (its hyperparameters come from the config on resume)."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            out[f"{index}.{name}"] = value.detach().contiguous().cpu()
    return out


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def save_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Replace `directory`/checkpoint as a whole (written beside it, swapped in by renames)."""
    from safetensors.torch import save_file, save_model

    def fill(tmp: Path) -> None:
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))  # handles tied weights, unlike save_file
        save_file(optimizer_tensors(optimizer), str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")

    replace_directory(directory / CHECKPOINT, fill)


def read_checkpoint_state(directory: Path) -> dict[str, Any] | None:
    """The saved counters, or None when there is no (whole) checkpoint."""
    path = directory / CHECKPOINT / "state.json"
    previous = directory / f".{CHECKPOINT}.old"  # a kill between replace_directory's two renames leaves it there
    if not path.is_file() and (previous / "state.json").is_file() and not (directory / CHECKPOINT).exists():
        previous.rename(directory / CHECKPOINT)
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise _damaged(directory, e) from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise _damaged(directory, ValueError("state.json has no step"))
    return state


def load_checkpoint(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Put the saved weights and optimizer state into a freshly built model and optimizer (same config)."""
    from safetensors.torch import load_file, load_model

    path = directory / CHECKPOINT
    device = next(model.parameters()).device
    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False, device=str(device))
        if missing or unexpected:
            raise ValueError(
                f"weights do not fit the model (missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
            )
        load_optimizer_tensors(optimizer, load_file(str(path / "optimizer.safetensors"), device=str(device)))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise _damaged(directory, e) from None


def _damaged(directory: Path, error: Exception) -> ClueAdvError:
    return ClueAdvError(
        f"cannot resume from {directory / CHECKPOINT}: {type(error).__name__}: {error}; rerun with --force to start "
        "the pretrain over"
    )
