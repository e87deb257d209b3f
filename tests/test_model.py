"""Tokenizer and model builder."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import TOKENIZER_DIR, smoke_config, tnews_labels

from clue_adv.config import ModelConfig
from clue_adv.errors import ClueAdvError
from clue_adv.model import attention_for, build_model, build_tokenizer, looks_local


def test_tokenizer_has_full_vocabulary_and_known_ids():
    tok = build_tokenizer(ModelConfig(name_or_path=str(TOKENIZER_DIR), init="random"))
    assert len(tok) == 21128
    assert tok("江疏影甜甜圈自拍")["input_ids"] == [101, 3736, 4541, 2512, 4494, 4494, 1750, 5632, 2864, 102]
    # line 344 of vocab.txt is U+2028 itself (whitespace in text, so the tokenizer stores it as ''); the ids
    # of every later token must not be shifted by reading the file with a splitter that breaks on U+2028.
    lines = (TOKENIZER_DIR / "vocab.txt").read_text(encoding="utf-8").split("\n")[:21128]
    assert lines[343] == "\u2028"
    # (the same stripping turns line 13503, '##' + U+2028, into '##')
    assert tok.convert_ids_to_tokens(list(range(21128))) == [t.rstrip("\u2028") for t in lines]


def test_missing_local_model_dir_is_named():
    with pytest.raises(ClueAdvError, match="model.name_or_path: directory not found: ./nope"):
        build_tokenizer(ModelConfig(name_or_path="./nope", init="random"))


def test_looks_local():
    assert looks_local("./x") and looks_local("/abs/x") and looks_local(str(TOKENIZER_DIR))
    assert not looks_local("bert-base-chinese") and not looks_local("hfl/chinese-roberta-wwm-ext")


def test_random_init_tiny_model_honours_architecture_and_seed():
    import torch

    cfg = smoke_config()
    torch.manual_seed(3)
    a = build_model(cfg, tnews_labels(), needs_double_backward=False)
    torch.manual_seed(3)
    b = build_model(cfg, tnews_labels(), needs_double_backward=False)
    assert a.config.num_hidden_layers == 1 and a.config.hidden_size == 64 and a.config.vocab_size == 21128
    assert a.config.id2label[5] == "106"
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert a.config._attn_implementation == "sdpa"
    c = build_model(cfg, tnews_labels(), needs_double_backward=True)
    assert c.config._attn_implementation == "eager"


def test_attention_choice():
    auto = ModelConfig(name_or_path="x", init="random")
    assert attention_for(auto, True) == "eager" and attention_for(auto, False) == "sdpa"
    assert attention_for(ModelConfig(name_or_path="x", init="random", attn_implementation="eager"), False) == "eager"


def test_cls_head_has_no_pooler_and_classifies_the_cls_vector():
    import torch

    model = build_model(smoke_config(model__head="cls"), tnews_labels(), needs_double_backward=False).eval()
    assert not [n for n, _ in model.named_parameters() if "pooler" in n]
    ids = torch.tensor([[101, 3736, 4541, 102]])
    hidden = model.bert(input_ids=ids).last_hidden_state
    expected = model.classifier(hidden[:, 0])
    assert torch.allclose(model(input_ids=ids).logits, expected, atol=1e-6)


def _tiny_pretrained_dir(root: Path, safetensors: bool) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=21128,
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        num_labels=15,
    )
    model = BertForSequenceClassification(config)
    if safetensors:
        model.save_pretrained(root)
    else:
        # transformers 5 ignores safe_serialization=False, so write the legacy pickle the old way.
        root.mkdir(parents=True)
        config.save_pretrained(root)
        torch.save(model.state_dict(), root / "pytorch_model.bin")
    return root


def test_a_pickle_only_model_directory_is_refused_without_unpickling(tmp_path, monkeypatch):
    import torch

    root = _tiny_pretrained_dir(tmp_path / "bin-only", safetensors=False)
    unpickled = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a) or pytest.fail("torch.load was called"))
    cfg = smoke_config(model__name_or_path=str(root), model__init="pretrained", model__architecture={})
    with pytest.raises(ClueAdvError, match="safetensors weights .* are required, it holds only pytorch_model.bin") as e:
        build_model(cfg, tnews_labels(), needs_double_backward=False)
    assert str(root) in str(e.value) and "save_pretrained" in str(e.value)
    assert unpickled == []


def test_a_safetensors_model_directory_loads_its_weights(tmp_path):
    import torch

    root = _tiny_pretrained_dir(tmp_path / "safe", safetensors=True)
    cfg = smoke_config(model__name_or_path=str(root), model__init="pretrained", model__architecture={})
    model = build_model(cfg, tnews_labels(), needs_double_backward=False)
    from safetensors.torch import load_file

    weights = load_file(root / "model.safetensors")
    name = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(model.state_dict()[name], weights[name])


def test_offline_hint_names_a_download_and_a_path_that_works_anywhere():
    with pytest.raises(ClueAdvError) as e:
        build_tokenizer(ModelConfig(name_or_path="bert-base-chinese"))
    message = str(e.value)
    assert "point it at a local directory" in message and "*.safetensors" in message
    assert "model.name_or_path=clue_adv/assets" not in message  # relative: only worked from the repo root
    assert f"model.name_or_path={TOKENIZER_DIR.resolve()}" in message and "smoke" in message


def test_a_tokenizer_that_did_not_load_its_vocabulary_is_refused():
    """transformers 5 can build a 5-token tokenizer without an error; a model of 21,128 ids then trains on [UNK]s."""
    from types import SimpleNamespace

    from clue_adv.errors import ClueAdvError
    from clue_adv.model import check_vocab_size

    model = SimpleNamespace(config=SimpleNamespace(vocab_size=21128))
    with pytest.raises(ClueAdvError, match="only 5 tokens"):
        check_vocab_size(list(range(5)), model)
    check_vocab_size(list(range(21128)), model)
    check_vocab_size(list(range(21000)), model)  # a vocabulary padded a little is fine
