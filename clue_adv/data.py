"""CLUE TNEWS/IFLYTEK: read (local JSON lines or the hub), map labels, tokenize once, batch by seed.

Labels: TNEWS ids are the strings "100".."116" with gaps (no "105", "111"), IFLYTEK "0".."118". Both
sources map them through labels.json, in file order, to 0..n-1; the original strings are kept for
reports and submission files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Sampler

from clue_adv.errors import DataError

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedTokenizerBase

    from clue_adv.config import RunConfig

ASSETS = Path(__file__).parent / "assets"


@dataclass(frozen=True)
class LabelSet:
    """The task's labels in labels.json order: index i <-> `ids[i]` (the CLUE string) and its description."""

    ids: tuple[str, ...]
    descriptions: tuple[str, ...]

    def index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.ids)}


@dataclass
class TaskData:
    train: Dataset
    dev: Dataset  # what the run evaluates: the dev file, or the held-out part of train (data.eval_split)
    labels: LabelSet


def _encodable(record: Any) -> bool:
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-empty line. Lines end at '\\n' only: IFLYTEK sentences contain
    U+2028, which str.splitlines() would treat as a line break."""
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    # Read bytes and decode line by line: a text-mode file decodes in chunks, so a bad byte would surface
    # as a UnicodeDecodeError with no line number, in the middle of iteration.
    try:
        f = open(path, "rb")  # noqa: SIM115 - the with below closes it; open errors need their own message
    except OSError as e:
        raise DataError(f"cannot read data file {path}: {e.strerror or e}") from None
    with f:
        for lineno, raw in enumerate(f, start=1):  # binary lines end at b"\n" only
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{path}:{lineno}: nested too deeply to be a CLUE record") from None
            if "\\u" in line and not _encodable(record):
                # JSON may escape a lone UTF-16 surrogate (\ud800), which no tokenizer or UTF-8 file can take
                raise DataError(f"{path}:{lineno}: a string holds a lone surrogate escape (not a character)")
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
            yield lineno, record


def read_labels(path: Path) -> LabelSet:
    ids, descriptions = [], []
    for lineno, record in jsonl_records(path):
        if "label" not in record:
            raise DataError(f"{path}:{lineno}: label record has no 'label' field")
        ids.append(str(record["label"]))
        descriptions.append(str(record.get("label_desc", record.get("label_des", ""))))
    if not ids:
        raise DataError(f"{path}: no labels")
    if len(set(ids)) != len(ids):
        raise DataError(f"{path}: duplicate label ids")
    return LabelSet(tuple(ids), tuple(descriptions))


def _valid_labels(labels: LabelSet, shown: int = 10) -> str:
    # IFLYTEK has 119 labels: listing them all would bury the message that names the bad one.
    if len(labels.ids) <= shown:
        return f"valid: {', '.join(labels.ids)}"
    return f"valid: {', '.join(labels.ids[:shown])}, … ({len(labels.ids)} in all, see labels.json)"


def read_split(path: Path, labels: LabelSet | None, limit: int | None = None) -> dict[str, list[Any]]:
    """Columns `sentence` and `label` (index into `labels`) of a CLUE JSON-lines file, plus `id` for an unlabelled one.
    With `labels=None` (an unlabelled test file) `label` is -1."""
    index = labels.index() if labels is not None else {}
    # ids only for an unlabelled (test) file, whose submission needs them: train/dev ids, of any type, unused
    columns: dict[str, list[Any]] = {"sentence": [], "label": [], **({"id": []} if labels is None else {})}
    for lineno, record in jsonl_records(path):
        if limit is not None and len(columns["sentence"]) >= limit:
            break
        if not isinstance(record.get("sentence"), str):
            raise DataError(f"{path}:{lineno}: record has no 'sentence' string")
        if labels is not None:
            if "label" not in record:
                raise DataError(f"{path}:{lineno}: record has no 'label' field")
            label = str(record["label"])
            if label not in index:
                raise DataError(f"{path}:{lineno}: label {label!r} is not in labels.json ({_valid_labels(labels)})")
            columns["label"].append(index[label])
        else:
            columns["label"].append(-1)
        columns["sentence"].append(record["sentence"])
        if labels is None:
            columns["id"].append(record.get("id", len(columns["id"])))
    if not columns["sentence"]:
        raise DataError(f"{path}: no records (empty split)")
    return columns


def bundled_labels(task: str) -> LabelSet:
    return read_labels(ASSETS / task / "labels.json")


def _from_hub(cfg: RunConfig) -> tuple[Dataset, Dataset, LabelSet]:
    import datasets

    name, config = cfg.data.hub_name, cfg.data.hub_config or cfg.task
    labels = bundled_labels(cfg.task)
    try:
        raw = datasets.load_dataset(name, config)
    except Exception as e:  # the hub raises many types (ConnectionError, FileNotFoundError, HfHubHTTPError...)
        raise DataError(
            f"could not load hub dataset {name!r} (config {config!r}): {type(e).__name__}: {e}\n"
            f"Offline? Point data.path at a local directory holding {cfg.task}'s train.json, dev.json and "
            f"labels.json from the public CLUE release (https://github.com/CLUEbenchmark/CLUE), e.g. "
            f"--set data.path=/path/to/clue/{cfg.task}"
        ) from None
    index = labels.index()

    def convert(split: str, limit: int | None) -> Dataset:
        ds = raw[split]
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        feature = ds.features["label"]
        # The hub stores labels as ClassLabel ints whose names are CLUE's label strings.
        to_name = feature.int2str if hasattr(feature, "int2str") else str

        def remap(batch: dict[str, list[Any]], rows: list[int]) -> dict[str, list[Any]]:
            out = []
            for row, raw_label in zip(rows, batch["label"], strict=True):
                label = to_name(raw_label)
                if label not in index:
                    raise DataError(
                        f"hub {name}/{config} [{split}] row {row}: label {label!r} is not in the task's labels"
                    )
                out.append(index[label])
            return {"label": out}

        return ds.map(remap, batched=True, with_indices=True, desc=None)

    return convert("train", _train_read_limit(cfg)), convert("validation", cfg.data.max_eval_samples), labels


def _from_local(cfg: RunConfig) -> tuple[Dataset, Dataset, LabelSet]:
    from datasets import Dataset

    root = cfg.data.local_dir(cfg.task)
    if not root.is_dir():
        raise DataError(f"data.path: directory not found: {root}")
    labels = read_labels(root / "labels.json")
    train = read_split(root / cfg.data.train_file, labels, _train_read_limit(cfg))
    dev = read_split(root / cfg.data.dev_file, labels, cfg.data.max_eval_samples)
    return Dataset.from_dict(train), Dataset.from_dict(dev), labels


def _train_read_limit(cfg: RunConfig) -> int | None:
    # A holdout is drawn from the whole training file, so max_train_samples can only cut what remains after it.
    return None if cfg.data.holdout_size else cfg.data.max_train_samples


def check_holdout(n: int, size: int) -> None:
    """A holdout of `size` rows must leave some of the `n` training rows to train on."""
    if size >= n:
        raise DataError(f"data.holdout_size: {size} leaves no training examples (the training split has {n})")


def holdout_indices(n: int, size: int, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held out): row indices of a split of `n` rows, each in file order; `size` rows drawn at random with
    `seed` are held out. Depends on nothing but (n, size, seed), so every run of a comparison holds out the same
    rows whatever its own seed."""
    check_holdout(n, size)
    held = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
    is_held = torch.zeros(n, dtype=torch.bool)
    is_held[held] = True
    return (~is_held).nonzero().flatten().tolist(), is_held.nonzero().flatten().tolist()


def _with_holdout(train: Dataset, dev: Dataset, cfg: RunConfig) -> tuple[Dataset, Dataset]:
    """(what is trained on, what is evaluated) after data.holdout_size / eval_split / max_*_samples."""
    if not cfg.data.holdout_size:
        return train, dev
    kept, held = holdout_indices(len(train), cfg.data.holdout_size, cfg.data.holdout_seed)
    if cfg.data.max_train_samples is not None:
        kept = kept[: cfg.data.max_train_samples]
    if cfg.data.eval_split == "dev":
        return train.select(kept), dev
    if cfg.data.max_eval_samples is not None:
        held = held[: cfg.data.max_eval_samples]
    return train.select(kept), train.select(held)


def cache_dir() -> Path:
    return Path(os.environ.get("CLUE_ADV_CACHE", Path.home() / ".cache" / "clue_adv"))


def tokenize(ds: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Tokenize once per (content, tokenizer, max_length): the result is cached on disk by datasets.map.
    No padding here: batches are padded dynamically, which matters for TNEWS (titles of ~22 characters)."""
    key = hashlib.sha256()
    key.update(ds._fingerprint.encode())
    key.update(f"{type(tokenizer).__name__}|{tokenizer.name_or_path}|{len(tokenizer)}|{max_length}".encode())
    path = cache_dir() / "tokenized" / f"{key.hexdigest()[:32]}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)

    def encode(batch: dict[str, list[Any]]) -> dict[str, Any]:
        enc = tokenizer(batch["sentence"], truncation=True, max_length=max_length)
        if "label" in batch:  # unlabelled text (pretraining) has none
            enc["labels"] = batch["label"]
        return enc

    keep = {"labels", "input_ids", "token_type_ids", "attention_mask"}
    out = ds.map(
        encode,
        batched=True,
        batch_size=1000,
        cache_file_name=str(path),
        load_from_cache_file=True,
        new_fingerprint=key.hexdigest()[:32],
        desc=None,
    )
    return out.remove_columns([c for c in out.column_names if c not in keep])


def _content_fingerprint(columns: dict[str, list[Any]]) -> str:
    return hashlib.sha256(json.dumps(columns, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:32]


def tokenize_texts(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Dataset:
    """Unlabelled texts, tokenized and cached like a task's split (input_ids, token_type_ids, attention_mask)."""
    from datasets import Dataset

    columns = {"sentence": texts}
    ds = Dataset.from_dict(columns)
    ds._fingerprint = _content_fingerprint(columns)  # in-memory datasets get random fingerprints: the cache would miss
    return tokenize(ds, tokenizer, max_length)


def load_task_data(cfg: RunConfig, tokenizer: PreTrainedTokenizerBase) -> TaskData:
    train, dev, labels = _from_local(cfg) if cfg.data.is_local else _from_hub(cfg)
    if len(labels.ids) != cfg.num_labels:
        raise DataError(f"{cfg.task} has {cfg.num_labels} labels but labels.json lists {len(labels.ids)}")
    train, dev = _with_holdout(train, dev, cfg)
    for name, ds in (("train", train), (cfg.data.eval_split, dev)):
        if len(ds) == 0:
            raise DataError(f"the {name} split is empty")
    if cfg.data.is_local:
        # Datasets built in memory get random fingerprints; fingerprint the content so the cache hits.
        train._fingerprint = _content_fingerprint(train.to_dict())
        dev._fingerprint = _content_fingerprint(dev.to_dict())
    return TaskData(tokenize(train, tokenizer, cfg.max_length), tokenize(dev, tokenizer, cfg.max_length), labels)


class LengthGroupedSampler(Sampler[int]):
    """A random permutation, sorted by length inside windows of `window` examples, longest first:
    batches of similar lengths (little padding) that still change every epoch."""

    def __init__(self, lengths: list[int], window: int, generator: torch.Generator) -> None:
        self.lengths = lengths
        self.window = window
        self.generator = generator

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        for start in range(0, len(order), self.window):
            chunk = order[start : start + self.window]
            yield from sorted(chunk, key=lambda i: -self.lengths[i])


def _collator(tokenizer: PreTrainedTokenizerBase, pad_to_multiple_of: int | None) -> Any:
    from transformers import DataCollatorWithPadding

    return DataCollatorWithPadding(tokenizer, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")


LOADER_WORKERS = 2  # on CUDA: enough to collate the next batches while the GPU runs the current one


def loader_options(device: torch.device) -> dict[str, Any]:
    """DataLoader options for feeding `device`. On CUDA: pinned host memory (a pinned batch is copied to the GPU
    asynchronously, `non_blocking=True`) and LOADER_WORKERS worker processes collating ahead, fewer where this
    process has fewer spare cores (a sweep worker's share). Not persistent: a loader draws its workers' seed from
    the global RNG each time it is iterated, as it does without workers, so the dropout draws that follow are the
    same with and without workers, and a resumed run's are an uninterrupted run's. On the CPU the model competes
    for the same cores: batches are collated in the training process."""
    if device.type != "cuda":
        return {}
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return {"pin_memory": True, "num_workers": min(LOADER_WORKERS, cores - 1)}


def train_loader(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    cfg: RunConfig,
    pad_to_multiple_of: int | None = None,
    **options: Any,
) -> DataLoader:
    """Shuffled batches whose order depends only on the run's seed (its own generator): runs of
    different strategies with the same seed see identical batches, so they can be compared in pairs.
    Padding is dynamic (to the longest example of the batch); `pad_to_multiple_of=8` suits GPU tensor cores
    and only costs time on a CPU (14% padding instead of 2% on TNEWS). `options`: `loader_options`'s (the order is
    drawn in this process whatever the workers)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.data.length_grouped:
        sampler: Sampler[int] = LengthGroupedSampler(
            [len(ids) for ids in ds["input_ids"]], 50 * cfg.batch_size, generator
        )
    else:
        sampler = torch.utils.data.RandomSampler(ds, generator=generator)
    return DataLoader(
        ds, batch_size=cfg.batch_size, sampler=sampler, collate_fn=_collator(tokenizer, pad_to_multiple_of), **options
    )


def eval_loader(
    ds: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    pad_to_multiple_of: int | None = None,
    **options: Any,
) -> DataLoader:
    """Dev batches sorted by length (accuracy does not depend on order; sorted batches carry almost no
    padding: 1.56× faster on TNEWS). Code that needs predictions in file order must not use this loader.
    `options`: `loader_options`'s."""
    lengths = [len(ids) for ids in ds["input_ids"]]
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    collate = _collator(tokenizer, pad_to_multiple_of)
    return DataLoader(ds, batch_size=batch_size, sampler=order, collate_fn=collate, **options)
