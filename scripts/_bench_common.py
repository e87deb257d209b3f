"""Shared by the benchmark scripts: model shapes, real CLUE batches, run configs, machine facts, output files.

The machines these run on are shared and noisy, so the scripts compare contenders side by side in one
process (interleaved) and report ratios; absolute times are only meaningful from a GPU.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import random
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

# Offline before transformers/datasets are imported: the benchmarks use only bundled files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

import clue_adv  # noqa: E402
from clue_adv.config import RunConfig, parse_config  # noqa: E402
from clue_adv.data import ASSETS, read_labels, read_split  # noqa: E402
from clue_adv.runenv import cpu_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ASSETS / "tokenizer"
RESULTS = REPO / "results" / "bench"

# The CPU model: 2 layers at hidden 128 with the real 21,128-token vocabulary (the shape REGULARIZERS.md's
# measurements used). `base` is bert-base-chinese's own config.json (12 × 768), random init.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2, "intermediate_size": 512},
    "base": {},
}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return torch.device(name)


def device_tag(device: torch.device) -> str:
    """`cpu`, or the GPU's name as a file-name slug (results from different GPUs must not overwrite each other)."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def run_config(
    *,
    task: str = "tnews",
    architecture: dict[str, int] | None = None,
    device: torch.device | str = "cpu",
    strategy: dict[str, Any] | None = None,
    **fields: Any,
) -> RunConfig:
    """A validated RunConfig on the bundled data and tokenizer with a random-init model of the given shape."""
    data: dict[str, Any] = {
        "experiment": "bench",
        "task": task,
        "data": {"path": str(ASSETS / task)},
        "model": {
            "name_or_path": str(TOKENIZER_DIR),
            "init": "random",
            "architecture": dict(architecture or {}),
        },
        "device": torch.device(device).type,
        "strategy": strategy or {"name": "none"},
    }
    for key, value in fields.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data, source="benchmark config")


@functools.cache
def load_tokenizer() -> Any:
    """The bundled bert-base-chinese tokenizer (loaded once: it is read-only here)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_DIR)


def fixed_batches(
    tokenizer: Any,
    *,
    task: str,
    count: int,
    batch_size: int,
    max_length: int,
    seed: int,
    pad_to_multiple_of: int | None,
) -> list[dict[str, torch.Tensor]]:
    """`count` batches of real training examples, drawn at random (as clue_adv's default sampler does) and
    padded dynamically to their longest example, rounded up to `pad_to_multiple_of` if given (as its
    collator does: pass `clue_adv.train.pad_multiple_for(device)`)."""
    from transformers import DataCollatorWithPadding

    labels = read_labels(ASSETS / task / "labels.json")
    split = read_split(ASSETS / task / "train.json", labels)
    rng = random.Random(seed)
    order = rng.sample(range(len(split["sentence"])), min(count * batch_size, len(split["sentence"])))
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")
    batches = []
    for start in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([split["sentence"][i] for i in idx], truncation=True, max_length=max_length)
        features = [{k: enc[k][j] for k in enc} | {"labels": split["label"][i]} for j, i in enumerate(idx)]
        batches.append(dict(collate(features)))
    if not batches:
        raise SystemExit(f"{task}: not enough training examples for one batch of {batch_size}")
    return batches


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def command_line(script: str, argv: list[str] | None) -> str:
    """How to rerun this: the script, relative to the repository, and its arguments."""
    args = sys.argv[1:] if argv is None else argv
    return "python " + shlex.join([os.path.relpath(script, REPO), *args])


def machine_info(device: torch.device, command: str) -> dict[str, Any]:
    """What a reader needs to judge a number: hardware, load, library versions, commit, date, command."""
    import datasets
    import transformers

    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
            "clue_adv": clue_adv.__version__,
        },
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "clue_adv")),
    }
    try:
        import accelerate

        info["versions"]["accelerate"] = accelerate.__version__
    except ImportError:
        pass
    return info


def machine_markdown(info: dict[str, Any]) -> list[str]:
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v)
    load = f"{info['load_average_at_start']} at start, {info.get('load_average_at_end', '?')} at end"
    hardware = f"{info['cpu']}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads)"
    if info.get("gpu"):
        hardware = f"{info['gpu']}; host CPU {hardware}"
    dirty = " (clue_adv/ had uncommitted changes)" if info.get("git_dirty") else ""
    return [
        f"- Command: `{info['command']}`",
        f"- Date (UTC): {info['date']}",
        f"- Machine: {hardware}",
        f"- Load average (1/5/15 min): {load}",
        f"- Versions: {versions}",
        f"- clue_adv commit: {info['git_commit']}{dirty}",
    ]


def finish_info(info: dict[str, Any]) -> None:
    info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]


def write_outputs(stem: str, payload: dict[str, Any], markdown: str, output_dir: Path = RESULTS) -> tuple[Path, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / f"{stem}.json", output_dir / f"{stem}.md"
    for path, text in ((json_path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n"), (md_path, markdown)):
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return json_path, md_path


def publish(payload: dict[str, Any], render: Any, script: str, argv: list[str] | None, out: Path | None) -> None:
    """The proxy scripts' ending: the CPU machine facts and command into `payload`, its markdown printed, and
    OUT.md / OUT.json written when `out` is given."""
    payload["machine"] = machine_info(torch.device("cpu"), command_line(script, argv))
    finish_info(payload["machine"])
    text = render(payload)
    print(text)
    if out:
        write_outputs(out.name, payload, text, out.parent)


def quantiles(values: list[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile), linear interpolation."""
    xs = sorted(values)
    if not xs:
        return (float("nan"),) * 3

    def q(p: float) -> float:
        pos = p * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return q(0.25), q(0.5), q(0.75)


def fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"
