"""Shared fixtures: offline environment, the bundled tokenizer, a tiny BERT, a real TNEWS batch."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path
from types import ModuleType

# Tests never touch the hub; set before transformers/datasets are imported anywhere.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from clue_adv.config import RunConfig, parse_config  # noqa: E402
from clue_adv.data import ASSETS, read_labels  # noqa: E402
from clue_adv.regularizers.base import Batch, StepContext  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ASSETS / "tokenizer"
SHARED = REPO.parent / "shared"
# Sweep overrides for a run small enough for a test: 64 examples (2 steps), 1 layer of width 32, 1 epoch.
TINY_RUN = {
    "data.max_train_samples": 64,
    "data.max_eval_samples": 64,
    "model.architecture.num_hidden_layers": 1,
    "model.architecture.hidden_size": 32,
    "model.architecture.intermediate_size": 64,
    "model.architecture.num_attention_heads": 2,
    "max_length": 32,
    "epochs": 1,
    "log_every_n_steps": 1,
}


# preexec_fn for child processes, so a test does not depend on the SIGINT disposition pytest itself inherited
# (a CI runner or a script's background job starts it ignored; a terminal leaves it at the default).
def sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def sigint_ignored_as_in_a_background_job() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="session", autouse=True)
def _one_thread() -> None:
    # Tiny models gain nothing from a second intra-op thread, and on 2 shared cores a thread that waits for
    # another process stalls every parallel region (measured: 20 steps took 10 s with 2 threads, 0.2 s with 1).
    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    os.environ["CLUE_ADV_CACHE"] = str(tmp_path_factory.mktemp("clue_adv_cache"))


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def tiny_bert(
    num_labels: int = 15,
    *,
    hidden: int = 32,
    layers: int = 2,
    dtype=torch.float32,
    seed: int = 0,
    dropout: float = 0.1,
    attn: str = "eager",
) -> torch.nn.Module:
    """A random-init BERT with the real 21,128-token vocabulary; milliseconds to build."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = AutoConfig.from_pretrained(
        TOKENIZER_DIR,
        num_labels=num_labels,
        num_hidden_layers=layers,
        hidden_size=hidden,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn)
    return model.to(dtype)


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    return tiny_bert()


SENTENCES = ["江疏影甜甜圈自拍，迷之角度竟这么好看", "以色列大选", "上联：黄山黄河黄皮肤黄土高原。怎么对下联？", "股市"]


@pytest.fixture
def batch(tokenizer) -> Batch:
    """Four real TNEWS-style titles of different lengths (so there is padding), labels 0..3."""
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    enc["labels"] = torch.tensor([0, 1, 2, 3])
    return Batch.from_mapping(dict(enc), torch.device("cpu"))


def load_script(name: str) -> ModuleType:
    """Import scripts/<name>.py (scripts are not a package) once per test session."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def make_ctx(model: torch.nn.Module, batch: Batch, **kwargs) -> StepContext:
    kwargs.setdefault("special_token_ids", (0, 100, 101, 102, 103))
    return StepContext(model, batch, **kwargs)


def step_grads(strategy, model: torch.nn.Module, batch: Batch, seed: int | None = None) -> dict[str, torch.Tensor]:
    """The parameter gradients one training_step leaves in .grad (from zero; .grad is cleared again after)."""
    model.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    strategy.training_step(make_ctx(model, batch))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_grads_close(
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    rtol: float = 1e-4,
    atol_scale: float | None = None,
) -> None:
    """Same parameters, close gradients; atol is relative to each tensor's largest entry (atol_scale, default rtol)."""
    assert actual.keys() == expected.keys()
    scale = rtol if atol_scale is None else atol_scale
    for name, want in expected.items():
        torch.testing.assert_close(actual[name], want, rtol=rtol, atol=scale * float(want.abs().max()) + 1e-9, msg=name)


def smoke_config(**overrides) -> RunConfig:
    """A run config on the bundled sample small enough for a test (seconds on 2 cores). Diagnostics are off
    unless a test turns them on (`diagnostics={...}`): they have their own tests, and their wall time would make
    two runs' metrics.jsonl differ."""
    data = {
        "experiment": "test",
        "task": "tnews",
        "data": {"path": str(ASSETS / "tnews"), "max_train_samples": 512, "max_eval_samples": 256},
        "model": {
            "name_or_path": str(TOKENIZER_DIR),
            "init": "random",
            "architecture": {
                "num_hidden_layers": 1,
                "hidden_size": 64,
                "num_attention_heads": 2,
                "intermediate_size": 128,
            },
        },
        "max_length": 48,
        "batch_size": 32,
        "epochs": 1,
        "optim": {"lr": 1e-3},
        "log_every_n_steps": 4,
        "diagnostics": {"enabled": False},
    }
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_config(data)


def tnews_labels():
    return read_labels(ASSETS / "tnews" / "labels.json")


@pytest.fixture
def saved_figures(monkeypatch) -> dict:
    """{file name: matplotlib figure} of every plot the report saves while the test runs, to check what is drawn:
    an empty figure with titles and labels would pass any pixel-level check of the PNG."""
    import clue_adv.report.plots as plots

    figures = {}
    save = plots._save

    def keep(fig, path):
        figures[path.name] = fig
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figures


def drawn_lines(ax) -> dict[str, list[tuple[float, float]]]:
    """Each labelled data line of an axes (in data coordinates, not axhline/axvline): its label -> its points."""
    return {
        line.get_label(): [(float(x), float(y)) for x, y in line.get_xydata()]
        for line in ax.lines
        if line.get_transform() is ax.transData and not line.get_label().startswith("_")
    }
