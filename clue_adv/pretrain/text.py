"""The text to pretrain on, split into a training part and a held-out slice, as token ids.

Only training text is read: a task's train split (local `train.json` or the hub's `train`), never dev or test, which
the fine-tuned model is evaluated on. TNEWS records give their title and keywords (one text: "title keywords"),
IFLYTEK records their description; a text file gives one text per line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clue_adv.data import jsonl_records, tokenize_texts
from clue_adv.errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from clue_adv.pretrain.config import PretrainConfig

# The held-out texts are drawn with this seed, not the run's: every run on the same text is measured on the same slice.
HELDOUT_SEED = 0


@dataclass
class Texts:
    train: list[list[int]]  # token ids, [CLS] ... [SEP], at most max_length
    heldout: list[list[int]]
    read: int  # texts read (before the held-out split and before dropping texts with no token to mask)
    dropped: int  # texts whose tokens are all special (e.g. only control characters): nothing to predict


def record_text(record: dict[str, Any]) -> str:
    """A CLUE record's text: its sentence, and TNEWS's keywords (comma-separated phrases) after a space."""
    keywords = record.get("keywords")
    sentence = record["sentence"]
    return f"{sentence} {keywords}" if isinstance(keywords, str) and keywords.strip() else sentence


def _local_task_texts(path: Path, limit: int | None) -> list[str]:
    texts = []
    for lineno, record in jsonl_records(path):
        if limit is not None and len(texts) >= limit:
            break
        if not isinstance(record.get("sentence"), str):
            raise DataError(f"{path}:{lineno}: record has no 'sentence' string")
        texts.append(record_text(record))
    return texts


def _hub_task_texts(name: str, config: str, limit: int | None) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split="train")
    except Exception as e:  # the hub raises many types (ConnectionError, FileNotFoundError, HfHubHTTPError...)
        raise DataError(
            f"could not load hub dataset {name!r} (config {config!r}, split 'train'): {type(e).__name__}: {e}\n"
            "Offline? Point data.path at a local directory of CLUE JSON-lines files (its train.json is read), "
            "or data.text_file at a text file with one text per line"
        ) from None
    if "sentence" not in ds.column_names:
        raise DataError(f"hub dataset {name}/{config}: no 'sentence' column (columns: {', '.join(ds.column_names)})")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    columns = [c for c in ("sentence", "keywords") if c in ds.column_names]
    return [record_text(dict(zip(columns, row, strict=True))) for row in zip(*(ds[c] for c in columns), strict=True)]


def read_text_file(path: Path, limit: int | None = None) -> list[str]:
    """One text per line ('\\n' only: U+2028 inside a text is not a break), blank lines skipped; a line that is not
    UTF-8 is an error naming file and line."""
    if not path.is_file():
        raise DataError(f"data.text_file: file not found: {path}")
    texts = []
    try:
        f = open(path, "rb")  # noqa: SIM115 - the with below closes it; open errors need their own message
    except OSError as e:
        raise DataError(f"cannot read text file {path}: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):
            if limit is not None and len(texts) >= limit:
                break
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
            if line:
                texts.append(line)
    return texts


def read_texts(cfg: PretrainConfig) -> tuple[list[str], str]:
    """The configured text and where it came from (for messages)."""
    d = cfg.data
    if d.text_file is not None:
        where = Path(d.text_file).expanduser()
        texts = read_text_file(where, d.max_texts)
    elif d.path is not None:
        root = Path(d.path.replace("{task}", str(cfg.task))).expanduser()
        if not root.is_dir():
            raise DataError(f"data.path: directory not found: {root}")
        where = root / d.train_file
        texts = _local_task_texts(where, d.max_texts)
    else:
        config = d.hub_config or str(cfg.task)
        where = Path(f"{d.hub_name}/{config}")
        texts = _hub_task_texts(d.hub_name, config, d.max_texts)
    if len(texts) < 2:
        raise DataError(f"{where}: {len(texts)} text(s); pretraining needs at least 2 (one is held out)")
    return texts, str(where)


def heldout_indices(count: int, fraction: float) -> list[int]:
    """Which of `count` texts are held out: round(fraction · count) of them (at least 1, at most count - 1), drawn
    with a fixed seed."""
    k = min(max(1, round(fraction * count)), count - 1)
    return sorted(random.Random(HELDOUT_SEED).sample(range(count), k))


def load_texts(cfg: PretrainConfig, tokenizer: PreTrainedTokenizerBase) -> Texts:
    texts, where = read_texts(cfg)
    ids = tokenize_texts(texts, tokenizer, cfg.max_length)["input_ids"]
    special = set(tokenizer.all_special_ids)
    held = set(heldout_indices(len(ids), cfg.data.heldout_fraction))
    train, heldout, dropped = [], [], 0
    for i, seq in enumerate(ids):
        if all(t in special for t in seq):
            dropped += 1
        else:
            (heldout if i in held else train).append(seq)
    if not train or not heldout:
        raise DataError(f"{where}: no text with a token to mask in the {'training' if not train else 'held-out'} part")
    return Texts(train, heldout, len(texts), dropped)
