"""What a GPU run needs besides its kernels (issue 17.4), checked on the CPU: loader workers and pinned memory on
CUDA only, the reserved peak memory, memory given back between in-process runs, and the opt-in deterministic mode,
set for the run and put back after it."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
from conftest import smoke_config

import clue_adv.data as data_module
import clue_adv.memory as memory_module
import clue_adv.sweep.local as local_module
import clue_adv.train as train_module
from clue_adv.data import loader_options
from clue_adv.memory import peak_memory, release_memory
from clue_adv.rundir import read_jsonl
from clue_adv.train import train


@pytest.mark.parametrize(("cores", "workers"), [(16, 2), (3, 2), (2, 1), (1, 0)])
def test_loader_options_pin_and_collate_ahead_on_cuda_only(monkeypatch, cores, workers):
    monkeypatch.setattr(data_module.os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert loader_options(torch.device("cpu")) == {}  # the model needs the cores; nothing to pin for
    # one core stays the training process's
    assert loader_options(torch.device("cuda")) == {"pin_memory": True, "num_workers": workers}


def _metrics_without_times(outcome) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "step_time_s"} for r in read_jsonl(outcome.directory / "metrics.jsonl")]


def test_setup_feeds_its_loaders_the_options_and_workers_change_nothing(tmp_path, monkeypatch):
    """Loader workers (as on CUDA; pinning needs a GPU) give the same batches in the same order and leave the same
    dropout draws (persistent workers would not: a reused iterator draws no seed from the global RNG at the next
    epoch): the same metrics and results as batches collated in the training process. The tokenizer is told not to
    warn in each forked worker, for the run only."""
    monkeypatch.delenv("TOKENIZERS_PARALLELISM", raising=False)
    cfg = smoke_config(data__max_train_samples=128, data__max_eval_samples=64, epochs=2, log_every_n_steps=1)
    plain = train(cfg, tmp_path / "plain", show_progress=False)

    loaders, seen_env = [], []
    real_train_loader = train_module.train_loader

    def spy(*args, **kwargs):
        loader = real_train_loader(*args, **kwargs)
        loaders.append(loader)
        seen_env.append(os.environ.get("TOKENIZERS_PARALLELISM"))
        return loader

    monkeypatch.setattr(train_module, "loader_options", lambda device: {"num_workers": 2})
    monkeypatch.setattr(train_module, "train_loader", spy)
    fed = train(cfg, tmp_path / "workers", show_progress=False)
    [loader] = loaders
    assert loader.num_workers == 2 and seen_env == ["false"]
    assert "TOKENIZERS_PARALLELISM" not in os.environ  # put back
    assert _metrics_without_times(fed) == _metrics_without_times(plain)
    assert fed.summary["final_train_loss"] == plain.summary["final_train_loss"]


def test_peak_memory_gives_the_reserved_peak_on_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20)
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 5 * 2**20)
    assert peak_memory(torch.device("cuda")) == {"peak_memory_mb": 3.0, "peak_memory_reserved_mb": 5.0}
    monkeypatch.setattr(memory_module, "process_peak_rss_mb", lambda: 7.0)
    assert peak_memory(torch.device("cpu")) == {"peak_memory_mb": 7.0}  # no allocator cache on the CPU


def test_release_memory_collects_cycles_then_empties_the_cuda_cache(monkeypatch):
    class Holder:
        pass

    holder = Holder()
    holder.model, holder.me = torch.nn.Linear(4, 4), holder  # a cycle: refcounting alone never frees it
    alive = weakref.ref(holder.model)
    del holder
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: seen.append(alive() is None))
    gc.disable()  # the collection must be release_memory's, not one the allocator happened to trigger
    try:
        release_memory()
    finally:
        gc.enable()
    assert seen == [True]  # emptied once, after the model was gone


def test_an_in_process_sweep_releases_memory_after_each_run_out_of_memory_too(tmp_path, monkeypatch):
    """A one-job sweep runs its cells in this process: after each one (here the first runs out of memory) the
    models it built are gone before the next starts."""
    from conftest import TINY_RUN
    from rich.console import Console
    from test_sweep_more import write_sweep

    from clue_adv.regularizers.gaussian_noise import GaussianNoise
    from clue_adv.sweep import load_plan, run_sweep

    models, released = [], []
    real_build = train_module.build_model

    def build(*args, **kwargs):
        model = real_build(*args, **kwargs)
        models.append(weakref.ref(model))
        return model

    def out_of_memory(self, ctx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def release():
        release_memory()
        released.append([m() is None for m in models])

    monkeypatch.setattr(train_module, "build_model", build)
    monkeypatch.setattr(GaussianNoise, "training_step", out_of_memory)
    monkeypatch.setattr(local_module, "release_memory", release)
    path = write_sweep(tmp_path, {"seeds": [1], "strategies": [{"name": "gaussian_noise"}, {"name": "none"}]})
    assert TINY_RUN["epochs"] == 1
    result = run_sweep(load_plan(path), jobs=1, console=Console(stderr=True, width=200), show_progress=False)
    assert [r.status for r in result.results] == ["failed", "completed"]
    assert released == [[True], [True, True]]


def _settings() -> tuple:
    return (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )


@pytest.mark.parametrize("preset", [None, ":16:8"])
def test_deterministic_mode_is_set_for_the_run_and_put_back(tmp_path, monkeypatch, preset):
    """`deterministic: true`: deterministic algorithms (warn only), cuDNN deterministic without benchmarking and
    cuBLAS's workspace (a value the environment gives is kept) while the run trains; everything as it was after it.
    Off (the default): nothing is touched."""
    if preset is None:
        monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    else:
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", preset)
    during = []
    real_build = train_module.build_model

    def build(*args, **kwargs):
        during.append(_settings())
        return real_build(*args, **kwargs)

    monkeypatch.setattr(train_module, "build_model", build)
    cfg = smoke_config(data__max_train_samples=32, data__max_eval_samples=32)
    before = _settings()
    assert before[:2] == (False, False)
    train(cfg, tmp_path / "default", show_progress=False)
    assert _settings() == before
    train(cfg.model_copy(update={"deterministic": True}), tmp_path / "deterministic", show_progress=False)
    assert _settings() == before
    assert during[0] == before
    assert during[1] == (True, True, True, False, preset or ":4096:8")
