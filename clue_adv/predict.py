"""`clue-adv predict`: a CLUE submission file from a finished run's saved model.

CLUE expects `tnews_predict.json` / `iflytek_predict.json`: one `{"id": ..., "label": "..."}` per line,
with the original label strings ("102", not the class index), in the test file's order.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clue_adv.config import TASKS, parse_config, require_nameable
from clue_adv.data import jsonl_records, read_split
from clue_adv.errors import ClueAdvError
from clue_adv.model import use_cls_vector
from clue_adv.rundir import atomic_write_text, first_non_directory, read_config, read_summary
from clue_adv.runenv import configure_environment


@dataclass
class Predictions:
    ids: list[Any]
    labels: list[str]
    path: Path
    warnings: list[str]


def _load(run: Path) -> tuple[Any, Any, Any, list[str]]:
    """Run config, model, tokenizer and label strings (index order) of a run with a saved model."""
    stored = read_config(run)
    if stored is None:
        raise ClueAdvError(f"{run}: not a run directory (no readable config.yaml)")
    cfg = parse_config(stored, source=str(run / "config.yaml"))
    model_dir = run / "model"
    if not (model_dir / "config.json").is_file():
        status = (read_summary(run) or {}).get("status", "unknown")
        raise ClueAdvError(
            f"{run}: no saved model in {model_dir} (run status: {status}); train with `save_model: true` "
            "(e.g. --set save_model=true) to keep the best-dev model"
        )
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if not any(model_dir.glob("*.safetensors")):
        # safetensors only: a pickled pytorch_model.bin (which could run code when loaded) is never read
        raise ClueAdvError(f"{model_dir}: no .safetensors weights; pickled checkpoints (.bin) are not loaded")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
    except Exception as e:  # a damaged save: bad JSON, truncated weights, a head of another size...
        raise ClueAdvError(f"{model_dir}: the saved model does not load ({type(e).__name__}: {e})") from None
    if cfg.model.head == "cls":
        # The saved weights have no pooler (the study head has none); loading built a fresh pooler,
        # which this removes again, exactly as training did.
        use_cls_vector(model)
    id2label = model.config.id2label
    labels = [str(id2label[i]) for i in range(len(id2label))]
    if len(labels) != cfg.num_labels:
        raise ClueAdvError(f"{model_dir}: the model has {len(labels)} labels, {cfg.task} has {cfg.num_labels}")
    return cfg, model, tokenizer, labels


def _check_run_status(run: Path, allow_incomplete: bool) -> None:
    """A submission comes from a completed run: an interrupted or failed one saved only its best model so far."""
    status = (read_summary(run) or {}).get("status", "unknown")
    if status != "completed" and not allow_incomplete:
        raise ClueAdvError(
            f"{run}: run status is {status!r}, not 'completed'; its saved model is the best one before it stopped. "
            "Finish the run (rerun its train command), or pass --allow-incomplete to predict with it anyway"
        )


def _task_warnings(task: str, test_file: Path, output: Path) -> list[str]:
    """Refuse a submission named for the other task; warn when the test file looks like the other task's.
    TNEWS records carry a `keywords` field and IFLYTEK's never do: the one cheap sign of a swapped file."""
    other = [t for t in TASKS if t != task]
    if output.name in {f"{t}_predict.json" for t in other}:
        raise ClueAdvError(
            f"--output {output}: this run is {task}; CLUE expects its predictions in {task}_predict.json"
        )
    with_keywords = [("keywords" in record) for _, record in jsonl_records(test_file)]
    looks_like = None
    if with_keywords and all(with_keywords):
        looks_like = "tnews"
    elif with_keywords and not any(with_keywords):
        looks_like = "iflytek"
    if task in TASKS and looks_like is not None and looks_like != task:
        return [
            f"{test_file}: its records look like {looks_like} test data "
            f"({'every' if looks_like == 'tnews' else 'no'} record has TNEWS's 'keywords' field), but the run is {task}"
        ]
    return []


def predict(
    run: str | Path,
    test_file: str | Path,
    output: str | Path | None = None,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    allow_incomplete: bool = False,
) -> Predictions:
    """Label every record of `test_file` with the run's best-dev model and write the submission file
    (default: <run>/<task>_predict.json). The run must be completed unless `allow_incomplete`."""
    import torch

    run = Path(run)
    require_nameable(run, "run directory", expands=False)
    require_nameable(test_file, "--test-file", expands=False)
    if read_config(run) is not None:  # checked before minutes of loading; _load names a non-run directory
        _check_run_status(run, allow_incomplete)
    if output is not None and (Path(output).is_dir() or first_non_directory(Path(output).parent) is not None):
        raise ClueAdvError(f"--output {output}: must be a file path whose folder exists or can be made")
    if device == "cuda" and not torch.cuda.is_available():
        raise ClueAdvError("--device cuda: no CUDA device is available")
    cfg, model, tokenizer, labels = _load(run)
    out = Path(output) if output is not None else run / f"{cfg.task}_predict.json"
    warnings = _task_warnings(cfg.task, Path(test_file), out)
    configure_environment(cfg)
    records = read_split(Path(test_file), labels=None)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_device = torch.device(device)
    model.to(torch_device).eval()
    from datasets import Dataset
    from transformers import DataCollatorWithPadding

    encoded = tokenizer(records["sentence"], truncation=True, max_length=cfg.max_length)
    dataset = Dataset.from_dict(dict(encoded))
    # Batches in file order (the submission's order); padding as in evaluation (to a multiple of 8 only on
    # CUDA, where tensor cores want it). Masked padding gets no attention, so it does not change a prediction.
    pad = 8 if torch_device.type == "cuda" else None
    collate = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad, return_tensors="pt")
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size or cfg.eval.batch_size, collate_fn=collate)
    predicted: list[int] = []
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(torch_device) for k, v in batch.items()}
            predicted += model(**batch).logits.argmax(-1).tolist()
    strings = [labels[i] for i in predicted]
    lines = [json.dumps({"id": i, "label": s}, ensure_ascii=False) for i, s in zip(records["id"], strings, strict=True)]
    atomic_write_text(out, "\n".join(lines) + "\n")
    return Predictions(records["id"], strings, out, warnings)
