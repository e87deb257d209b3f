"""CLUE loading on the bundled sample: label mapping with gaps, U+2028, errors naming file:line, the hub path."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import smoke_config

from clue_adv.data import ASSETS, eval_loader, load_task_data, read_labels, read_split, train_loader
from clue_adv.errors import DataError


def test_tnews_label_gap_maps_to_contiguous_indices():
    labels = read_labels(ASSETS / "tnews" / "labels.json")
    assert len(labels.ids) == 15
    assert "105" not in labels.ids and "111" not in labels.ids
    index = labels.index()
    assert index["100"] == 0 and index["104"] == 4 and index["106"] == 5 and index["116"] == 14
    assert labels.descriptions[index["102"]] == "news_entertainment"


def test_iflytek_sentence_with_line_separator_stays_one_record():
    path = ASSETS / "iflytek" / "train.json"
    labels = read_labels(ASSETS / "iflytek" / "labels.json")
    cols = read_split(path, labels)
    raw_lines = path.read_bytes().count(b"\n")
    assert len(cols["sentence"]) == raw_lines == 1000  # splitlines() would give more
    with_sep = [s for s in cols["sentence"] if "\u2028" in s]
    assert len(with_sep) == 1 and with_sep[0].count("\u2028") == 12
    assert len(labels.ids) == 119 and max(cols["label"]) < 119


def test_unknown_label_names_file_and_line(tmp_path):
    (tmp_path / "labels.json").write_text((ASSETS / "tnews" / "labels.json").read_text(encoding="utf-8"))
    rows = [{"label": "100", "sentence": "a"}, {"label": "105", "sentence": "b"}]
    (tmp_path / "train.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataError, match=rf"{tmp_path}/train.json:2: label '105' is not in labels.json"):
        read_split(tmp_path / "train.json", read_labels(tmp_path / "labels.json"))


def test_malformed_json_line_names_file_and_line(tmp_path):
    (tmp_path / "x.json").write_text('{"label": "100", "sentence": "a"}\n{"label": "100", "sent\n')
    with pytest.raises(DataError, match=r"x.json:2: not valid JSON"):
        read_split(tmp_path / "x.json", read_labels(ASSETS / "tnews" / "labels.json"))


def test_invalid_utf8_line_names_file_and_line(tmp_path):
    good = json.dumps({"label": "100", "sentence": "你好"}, ensure_ascii=False).encode()
    (tmp_path / "x.json").write_bytes(good + b"\n" + good + b"\n" + b'{"label": "100", "sentence": "\xff"}\n')
    with pytest.raises(DataError, match=r"x.json:3: not valid UTF-8"):
        read_split(tmp_path / "x.json", read_labels(ASSETS / "tnews" / "labels.json"))


def test_unreadable_data_file_is_a_data_error(tmp_path, monkeypatch):
    import clue_adv.data

    (tmp_path / "x.json").write_text('{"label": "100", "sentence": "a"}\n')
    labels = read_labels(ASSETS / "tnews" / "labels.json")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    # chmod cannot make a file unreadable for root (CI containers), so fail the open itself.
    monkeypatch.setattr(clue_adv.data, "open", denied, raising=False)
    with pytest.raises(DataError, match=r"cannot read data file .*x.json: Permission denied"):
        read_split(tmp_path / "x.json", labels)


def test_empty_split_is_an_error(tmp_path):
    (tmp_path / "x.json").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        read_split(tmp_path / "x.json", read_labels(ASSETS / "tnews" / "labels.json"))


def test_tokenized_sample_and_dynamic_padding(tokenizer):
    cfg = smoke_config()
    data = load_task_data(cfg, tokenizer)
    assert len(data.train) == 512 and len(data.dev) == 256
    assert set(data.train.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
    batch = next(iter(train_loader(data.train, tokenizer, cfg)))
    # dynamic padding: the batch is exactly as wide as its longest member, not max_length
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max()) < 48
    gpu_batch = next(iter(train_loader(data.train, tokenizer, cfg, pad_to_multiple_of=8)))
    width = gpu_batch["input_ids"].shape[1]
    assert width % 8 == 0 and width - 8 < int(gpu_batch["attention_mask"].sum(1).max()) <= width


def test_eval_batches_are_sorted_by_length_and_cover_the_split(tokenizer):
    data = load_task_data(smoke_config(), tokenizer)
    loader = eval_loader(data.dev, tokenizer, 64)
    widths = [b["input_ids"].shape[1] for b in loader]
    assert widths == sorted(widths) and widths[0] < widths[-1]
    assert sorted(loader.sampler) == list(range(len(data.dev)))


def test_same_seed_same_batches_different_seed_different(tokenizer):
    cfg = smoke_config()
    data = load_task_data(cfg, tokenizer)

    def first_labels(seed):
        loader = train_loader(data.train, tokenizer, smoke_config(seed=seed))
        return [b["labels"] for _, b in zip(range(3), loader)]

    a, b, c = first_labels(1), first_labels(1), first_labels(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_length_grouped_batches_pad_less(tokenizer):
    data = load_task_data(smoke_config(), tokenizer)

    def padding(cfg):
        total = real = 0
        for b in train_loader(data.train, tokenizer, cfg):
            total += b["attention_mask"].numel()
            real += int(b["attention_mask"].sum())
        return total - real

    plain, grouped = padding(smoke_config()), padding(smoke_config(data__length_grouped=True))
    assert grouped < 0.6 * plain
    # still every example exactly once per epoch
    seen = sorted(i for i in train_loader(data.train, tokenizer, smoke_config(data__length_grouped=True)).sampler)
    assert seen == list(range(len(data.train)))


def test_hub_path_goes_through_the_same_label_mapping(monkeypatch, tokenizer):
    """The hub cannot be reached here: stand in for `datasets.load_dataset` and check the call and mapping."""
    import datasets

    ids = read_labels(ASSETS / "tnews" / "labels.json").ids
    # The hub's ClassLabel order must not be labels.json order, or skipping the name mapping would still pass.
    names = list(reversed(ids))
    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    calls = []

    def fake_load_dataset(name, config):
        calls.append((name, config))
        cols = read_split(ASSETS / "tnews" / "dev.json", read_labels(ASSETS / "tnews" / "labels.json"), 64)
        hub_labels = [names.index(ids[i]) for i in cols["label"]]
        ds = datasets.Dataset.from_dict({"sentence": cols["sentence"], "label": hub_labels}, features=features)
        return datasets.DatasetDict({"train": ds, "validation": ds.select(range(32))})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    cfg = smoke_config(data={"max_train_samples": 40})
    assert not cfg.data.is_local
    data = load_task_data(cfg, tokenizer)
    assert calls == [("clue/clue", "tnews")]
    assert len(data.train) == 40 and len(data.dev) == 32
    local = read_split(ASSETS / "tnews" / "dev.json", read_labels(ASSETS / "tnews" / "labels.json"), 40)
    assert data.train["labels"] == local["label"]
    assert local["label"] != [names.index(ids[i]) for i in local["label"]]  # the two orders differ on this sample


def test_hub_failure_says_how_to_go_local(monkeypatch, tokenizer):
    import datasets

    def unreachable(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(DataError, match=r"holding tnews's train.json, dev.json and labels.json"):
        load_task_data(smoke_config(data={}), tokenizer)


def test_unknown_label_message_lists_only_the_first_labels(tmp_path):
    (tmp_path / "x.json").write_text('{"label": "999", "sentence": "a"}\n')
    with pytest.raises(DataError) as info:
        read_split(tmp_path / "x.json", read_labels(ASSETS / "iflytek" / "labels.json"))
    message = str(info.value)
    assert "label '999' is not in labels.json (valid: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, … (119 in all" in message
    assert ", 10," not in message and len(message) < 300


def test_a_hub_label_outside_the_task_names_its_split_and_row(monkeypatch, tokenizer):
    import datasets

    ids = list(read_labels(ASSETS / "tnews" / "labels.json").ids)
    features = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=[*ids, "999"])}
    )
    labels = [0] * 10
    labels[7] = len(ids)  # "999"

    def fake_load_dataset(name, config):
        ds = datasets.Dataset.from_dict({"sentence": ["句子"] * 10, "label": labels}, features=features)
        return datasets.DatasetDict({"train": ds, "validation": ds})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError, match=r"\[train\] row 7: label '999' is not in the task's labels"):
        load_task_data(smoke_config(data={}), tokenizer)
