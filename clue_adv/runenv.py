"""The process and the device a run (training, pretraining, prediction) runs on, kept apart from the recipes
that use them: the hub's offline switches and quiet library logs, and deterministic kernels, each set for the run
and put back when it ends (a sweep runs its cells in one process); the note before a run first tries the hub; the
device, the precision and the batch padding chosen for it."""

from __future__ import annotations

import contextlib
import os
import platform
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clue_adv.config import RunConfig
from clue_adv.errors import ClueAdvError
from clue_adv.model import looks_local


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def host_facts() -> dict[str, Any]:
    """The machine a run or a sweep ran on, for its record: a CPU time needs the CPU and the threads behind it."""
    return {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(terse=True),
    }


def all_sources_local(cfg: RunConfig) -> bool:
    """Whether the model, the tokenizer and the data are all read from local paths: then nothing needs the hub."""
    names = [cfg.model.name_or_path, cfg.model.tokenizer or cfg.model.name_or_path]
    return cfg.data.is_local and all(looks_local(n) for n in names)


_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
_RUN_VARS = (*_OFFLINE_VARS, "TOKENIZERS_PARALLELISM")  # what a run may set, put back when it ends


def configure_environment(cfg: RunConfig) -> Callable[[], None]:
    """Offline when nothing needs the hub (so nothing tries the network or waits on it); quiet HF logs.

    Returns a function that puts the offline settings back as they were: a sweep runs cells in one process, and
    a local cell must not force a later hub cell offline."""
    saved_env = {name: os.environ.get(name) for name in _RUN_VARS}
    saved_constants: list[tuple[Any, str, Any]] = []
    if all_sources_local(cfg):
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        # huggingface_hub and datasets read the variables into constants at import (is_offline_mode() returns
        # huggingface_hub's), so setting the variables alone does nothing once they are imported.
        with contextlib.suppress(ImportError):
            import huggingface_hub.constants as hub_constants

            saved_constants.append((hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE))
            hub_constants.HF_HUB_OFFLINE = True
        with contextlib.suppress(ImportError):
            import datasets.config as datasets_config

            for name in _OFFLINE_VARS:
                saved_constants.append((datasets_config, name, getattr(datasets_config, name)))
                setattr(datasets_config, name, True)
    import datasets
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # transformers 5's per-tensor 'Loading weights' bar
    datasets.utils.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    with contextlib.suppress(ImportError, AttributeError):
        import huggingface_hub.utils

        # Without a network its retries log a "Retrying in Ns" warning each; the failure itself is reported once,
        # with how to run from local files. Download progress bars (real use, with the hub) stay.
        huggingface_hub.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")

    def restore() -> None:
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for module, name, value in reversed(saved_constants):
            setattr(module, name, value)

    return restore


CUBLAS_WORKSPACE = ":4096:8"  # what PyTorch's reproducibility notes ask of cuBLAS (CUDA >= 10.2) for determinism


def deterministic_mode(enabled: bool) -> Callable[[], None]:
    """`deterministic: true`: PyTorch's deterministic algorithms (an operation without one warns, once, rather than
    failing the run), cuDNN's deterministic kernels without benchmarking, and cuBLAS's fixed workspace
    (CUBLAS_WORKSPACE_CONFIG, unless the environment sets it; cuBLAS reads it once per process, when a run first
    uses the GPU). Slower on a GPU; the same run then gives the same numbers twice on the same machine.

    Returns a function that puts every setting back: a sweep runs cells in one process."""
    if not enabled:
        return lambda: None
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False

    def restore() -> None:
        algorithms, warn_only, cudnn_deterministic, cudnn_benchmark, workspace = saved
        torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_deterministic, cudnn_benchmark
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
        else:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = workspace

    return restore


def resolve_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ClueAdvError("device: cuda was asked for but no CUDA device is available")
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda")


def autocast_for(cfg: RunConfig, device: torch.device) -> tuple[str, Callable[[], Any]]:
    """The precision context, chosen once. bf16 needs no loss scaler (unlike fp16)."""
    bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if not bf16:
        return "fp32", contextlib.nullcontext
    return "bf16", lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def pad_multiple_for(device: torch.device) -> int | None:
    """Batches are padded to their longest example, rounded up to a multiple of 8 on CUDA (tensor cores like
    it); on a CPU the rounding only adds work (14% padding instead of 2% on TNEWS)."""
    return 8 if device.type == "cuda" else None


def note_hub_use(cfg: Any, console: Any) -> None:
    """When a config (a run or pretrain config) reads from the hub and the hub is not switched off, say once, before
    trying, how to run offline."""
    if not all_sources_local(cfg) and os.environ.get("HF_HUB_OFFLINE", "").upper() not in ("1", "TRUE", "ON", "YES"):
        _hub_note(console)


_hub_note_shown = False


def _hub_note(console: Any) -> None:
    """Said once per process, before the hub is first tried: without a network its retries take about a minute
    before the error (which then says the same)."""
    global _hub_note_shown
    if _hub_note_shown:
        return
    _hub_note_shown = True
    from rich.console import Console

    (console or Console(stderr=True)).print(
        "note: model/data come from the Hugging Face hub (or its cache); without a network set HF_HUB_OFFLINE=1, "
        "or point model.name_or_path and data.path at local directories",
        highlight=False,
    )
