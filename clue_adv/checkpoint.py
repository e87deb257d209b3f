"""Resumable checkpoints inside a run directory (`checkpoint.every_epoch`).

    <run>/checkpoint/epoch-<k>/
        model.safetensors   the model's weights
        state.pt            optimizer, scheduler and strategy state, the torch RNG states, and the diagnostics' state
                            (results so far; the best model's weights when `when: end` must measure it later and
                            the model no longer holds them): tensors and plain values only, read back with
                            torch.load(weights_only=True), which runs no pickled code
        loop.json           the loop's bookkeeping (steps, dev history, best epoch, ...), metrics.jsonl's size at
                            that moment, Python's and NumPy's RNG states, and what the data looked like

Written after the epoch's evaluation, under a temporary name that is renamed into place once every file is on
disk; the older epochs are removed after that, so a kill at any moment leaves the last whole checkpoint.
Everything that decides the rest of the run is in it: weights, optimizer moments, learning-rate schedule, the
strategy's own state (SMART's EMA teacher), the global RNG (dropout, noise) and the sampler's generator (the
data order of the epochs to come), so a resumed run ends exactly as an uninterrupted one.

`save_run` and `resume` are what `train` calls: the loop's state (`runstate.LoopState`) in, the same out.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clue_adv.errors import ClueAdvError
from clue_adv.regularizers.base import PassCounter, Strategy
from clue_adv.run_diagnostics import RunDiagnostics
from clue_adv.rundir import CHECKPOINT_DIR, acquire_run_lock, resume_run
from clue_adv.runstate import LoopState, Run

FORMAT = 2  # raised when the files change: an older checkpoint is then not used (the run starts over)
_EPOCH_DIR = re.compile(r"epoch-(\d+)")


class Unusable(Exception):
    """A checkpoint that cannot be resumed from (damaged, another format, other data): the run starts over."""


@dataclass
class Resumable:
    """What a checkpoint saves and puts back, besides the loop's own bookkeeping."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler | None
    strategy: Strategy
    sampler_generator: torch.Generator
    diagnostics: RunDiagnostics | None = None


def latest(directory: Path) -> Path | None:
    """The newest whole checkpoint of the run in `directory`, or None."""
    root = directory / CHECKPOINT_DIR
    if root.is_symlink() or not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _EPOCH_DIR.fullmatch(p.name)) and p.is_dir()]
    return max(found)[1] if found else None


def save(directory: Path, epoch: int, parts: Resumable, loop: dict[str, Any]) -> None:
    """Write epoch `epoch`'s checkpoint (`loop`: the loop's JSON-able bookkeeping), then drop the older ones."""
    from safetensors.torch import save_model

    root = directory / CHECKPOINT_DIR
    if root.is_symlink():  # planted: removed, never written through
        root.unlink()
    root.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".epoch-{epoch}."))
    final = root / f"epoch-{epoch}"
    try:
        save_model(parts.model, str(tmp / "model.safetensors"))
        state = {
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict() if parts.scheduler is not None else None,
            "strategy": parts.strategy.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "sampler_rng": parts.sampler_generator.get_state(),
            "diagnostics": parts.diagnostics.state_dict() if parts.diagnostics is not None else None,
        }
        torch.save(state, tmp / "state.pt")
        _, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
        loop = {
            "format": FORMAT,
            "epoch": epoch,
            **loop,
            "python_rng": _jsonable(random.getstate()),
            "numpy_rng": [keys.tolist(), int(pos), int(has_gauss), float(cached)],
        }
        (tmp / "loop.json").write_text(json.dumps(loop), encoding="utf-8")
        for path in tmp.iterdir():  # on disk before the rename makes the checkpoint count
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in root.iterdir():
        if old != final:
            if old.is_symlink() or not old.is_dir():
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)


def read(path: Path, expect: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The loop bookkeeping and the tensor state of checkpoint `path`, read without applying anything. Raises
    Unusable when it is damaged, of another format, or its `expect` fields (data sizes) differ from this run's."""
    try:
        loop = json.loads((path / "loop.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise Unusable(f"{path / 'loop.json'} cannot be read ({e})") from None
    if not isinstance(loop, dict) or loop.get("format") != FORMAT:
        raise Unusable(f"{path} is not a checkpoint this version writes (format {FORMAT})")
    for key, value in expect.items():
        if loop.get(key) != value:
            raise Unusable(f"{key} is {value} now but {loop.get(key)} in the checkpoint (the data changed?)")
    if not (path / "model.safetensors").is_file():
        raise Unusable(f"{path / 'model.safetensors'} is missing")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file: torch raises many types (UnpicklingError, RuntimeError...)
        raise Unusable(f"{path / 'state.pt'} cannot be read ({type(e).__name__}: {e})") from None
    return loop, state


def restore(path: Path, parts: Resumable, loop: dict[str, Any], state: dict[str, Any]) -> None:
    """Put what `read` returned back into the model, optimizer, scheduler, strategy and RNGs."""
    from safetensors.torch import load_model

    device = next(parts.model.parameters()).device
    load_model(parts.model, str(path / "model.safetensors"), strict=True, device=str(device))
    parts.optimizer.load_state_dict(state["optimizer"])
    if parts.scheduler is not None:
        parts.scheduler.load_state_dict(state["scheduler"])
    parts.strategy.load_state_dict(state["strategy"])
    if parts.diagnostics is not None:
        parts.diagnostics.load_state_dict(state["diagnostics"], parts.model)
    parts.sampler_generator.set_state(state["sampler_rng"])
    torch.set_rng_state(state["torch_rng"])
    if torch.cuda.is_available() and state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    random.setstate(_tupled(loop["python_rng"]))
    keys, pos, has_gauss, cached = loop["numpy_rng"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_run(run: Run, state: LoopState, metrics_bytes: int) -> None:
    """Checkpoint `run` after epoch `state.epoch` (`metrics_bytes`: metrics.jsonl's size now)."""
    # the window's device-tensor metrics as numbers: the loop state is written as JSON
    state.log_window = {k: [float(x) for x in v] for k, v in state.log_window.items()}
    loop = {"state": asdict(state), "passes": asdict(run.learner.counter), "metrics_bytes": metrics_bytes}
    save(run.directory, state.epoch, _resumable(run), loop | _data_shape(run))


def resume(run: Run, say: Callable[[str], None]) -> LoopState | None:
    """The loop state of the run's last checkpoint, with the model, optimizer, scheduler, strategy, diagnostics
    and RNGs put back as they were then, and metrics.jsonl cut back to that moment; None when there is no usable
    checkpoint (the run starts over, after `say` told why)."""
    path = latest(run.directory)
    if path is None:
        return None
    acquire_run_lock(run.directory)  # before reading: no other process may be writing there
    try:
        loop, tensors = read(path, _data_shape(run))
        state = LoopState(**loop["state"])
        passes = PassCounter(**loop["passes"])
        metrics_bytes = loop["metrics_bytes"]
        if (run.directory / "metrics.jsonl").stat().st_size < metrics_bytes:
            raise Unusable("metrics.jsonl is shorter than when the checkpoint was written")
    except (Unusable, OSError, KeyError, TypeError) as e:
        say(f"{run.directory}: not resuming from {path.name} ({e}); starting over")
        return None
    try:
        restore(path, _resumable(run), loop, tensors)
    except Exception as e:  # read fine but does not fit the model built from the same config: not silently redone
        raise ClueAdvError(
            f"{path} does not fit this run ({type(e).__name__}: {e}); rerun with --force to start over"
        ) from None
    run.learner.counter = passes
    resume_run(run.cfg, run.directory, metrics_bytes)
    state.resumed_from.append(state.epoch)
    say(f"{run.directory}: resuming after epoch {state.epoch} (step {state.step}) from its checkpoint")
    return state


def _resumable(run: Run) -> Resumable:
    learner = run.learner
    # Both training samplers (random, length-grouped) draw every epoch's order from this one seeded generator.
    generator = run.loader.sampler.generator
    return Resumable(learner.model, learner.optimizer, learner.scheduler, learner.strategy, generator, run.diagnostics)


def _data_shape(run: Run) -> dict[str, Any]:
    """What a checkpoint must agree on with the run resuming it: the same config can name changed data files."""
    return {
        "train_examples": len(run.data.train),
        "dev_examples": len(run.data.dev),
        "steps_per_epoch": run.steps_per_epoch,
        "data_fingerprint": [getattr(ds, "_fingerprint", None) for ds in (run.data.train, run.data.dev)],
    }


def _jsonable(value: Any) -> Any:
    return [_jsonable(v) for v in value] if isinstance(value, tuple | list) else value


def _tupled(value: Any) -> Any:
    # random.setstate wants the nested tuples random.getstate gave; JSON made them lists
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value
