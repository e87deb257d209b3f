"""No strategy reads a device value on the host during a step (issue 17.3).

On a GPU every such read (`float(t)`, `t.item()`, `bool(t)`, `if t > 0`, and the data-dependent sizes of `unique`,
`nonzero` and boolean indexing) stops the host until the device has finished all queued work. A CPU cannot show a
sync, but the `meta` device can: its tensors have shapes and no data, so every read of a value raises. The model is
a small stand-in with StepContext's interface, because transformers' BERT itself reads its attention mask
(`padding_mask.all()` when it builds the mask), which is the model's sync, not the strategy's.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from conftest import make_ctx

from clue_adv.regularizers import build_strategy, registry
from clue_adv.regularizers.base import Batch


class StandIn(torch.nn.Module):
    """Embedding → dropout → tanh layer → masked mean → classifier: what StepContext calls, no host reads."""

    def __init__(self, vocab: int = 21128, hidden: int = 16, labels: int = 4) -> None:
        super().__init__()
        self.embeddings = torch.nn.Embedding(vocab, hidden)
        self.dropout = torch.nn.Dropout(0.1)
        self.layer = torch.nn.Linear(hidden, hidden)
        self.classifier = torch.nn.Linear(hidden, labels)
        self.register_buffer("scale", torch.ones(hidden))  # a buffer, as BERT has, for SMART's teacher copy

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embeddings

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, token_type_ids=None):
        x = self.embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        h = torch.tanh(self.layer(self.dropout(x))) * self.scale
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return SimpleNamespace(logits=self.classifier((h * m).sum(1) / m.sum(1)))


def _cases() -> list:
    cases = []
    for name, cls in registry().items():
        fields = cls.config_class.model_fields
        targets = ["embedding_output", "embedding_matrix"] if "target" in fields else [None]
        for target in targets:
            params = {} if target is None else {"target": target}
            cases.append(pytest.param(name, params, id=f"{name}-{target}" if target else name))
            if "epsilon_unit" in fields:  # ε measured on the batch: a device tensor, never read
                cases.append(pytest.param(name, params | {"epsilon_unit": "relative"}, id=f"{name}-{target}-relative"))
    cases += [
        pytest.param("gradient_penalty", {"mode": mode, "fd_step": step}, id=f"gradient_penalty-{mode}-{step}")
        for mode, step in [("normalized", "scaled"), ("finite_difference", "scaled"), ("finite_difference", "unit")]
    ]
    cases.append(pytest.param("consistency", {"sigma": 0.1, "same_dropout_mask": True}, id="consistency-noise-only"))
    cases.append(pytest.param("pgd", {"random_start": True, "norm": "linf"}, id="pgd-random-linf"))
    return cases


@pytest.mark.parametrize(("name", "params"), _cases())
def test_a_step_reads_no_device_value_on_the_host(name, params, tokenizer):
    from conftest import SENTENCES

    enc = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    enc["labels"] = torch.tensor([0, 1, 2, 3])
    batch = Batch.from_mapping(enc, torch.device("meta"))  # keeps the CPU input_ids: the matrix rows come from them
    model = StandIn().to("meta")
    strategy = build_strategy(registry()[name].config_class(**params))
    strategy.setup(model)
    ctx = make_ctx(model, batch)
    result = strategy.training_step(ctx)  # raises at the first host read
    assert result.loss.device.type == "meta"
    for key, value in result.metrics.items():  # device tensors, or nan for "not applicable"
        assert (isinstance(value, torch.Tensor) and value.device.type == "meta" and value.dim() == 0) or (
            isinstance(value, float) and math.isnan(value)
        ), key
    assert all(p.grad is not None for p in model.parameters())
    strategy.after_optimizer_step(model)  # SMART's EMA teacher update


def test_the_stand_in_does_raise_on_a_host_read(tokenizer):
    """The test above is not vacuous: a float() of a meta tensor raises, as does the old matrix row lookup."""
    t = torch.ones((), device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        float(t)
    with pytest.raises((RuntimeError, NotImplementedError)):
        torch.unique(torch.ones(3, device="meta", dtype=torch.long))


def test_the_loop_reads_tensor_metrics_when_it_logs_and_checkpoints(tmp_path, monkeypatch):
    """The strategies' metrics stay device tensors through the loop's window: they are numbers in metrics.jsonl, and
    in a checkpoint written mid-window (its loop state is JSON: a tensor there fails the run)."""
    import json

    from conftest import smoke_config

    from clue_adv import checkpoint
    from clue_adv.train import train

    windows = []
    save = checkpoint.save

    def spy(directory, epoch, parts, loop):
        windows.append(loop["state"]["log_window"])
        return save(directory, epoch, parts, loop)

    cfg = smoke_config(
        strategy={"name": "vat"},
        data__max_train_samples=64,
        data__max_eval_samples=32,
        epochs=2,
        log_every_n_steps=3,  # 2 steps an epoch: the epoch-1 checkpoint holds an unlogged window
        checkpoint__every_epoch=True,
    )
    monkeypatch.setattr(checkpoint, "save", spy)
    outcome = train(cfg, tmp_path, show_progress=False)
    assert outcome.summary["status"] == "completed"
    assert windows and windows[0]["kl"] and all(isinstance(v, float) for v in windows[0]["kl"])
    lines = [json.loads(line) for line in (outcome.directory / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["type"] == "train"]
    assert train_lines and all(isinstance(line["kl"], float) for line in train_lines)
