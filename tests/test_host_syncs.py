"""No strategy reads a device value on the host during a step, and the loop reads its steps' values once per logging
window (issue 17.3).

On a GPU every such read (`float(t)`, `t.item()`, `bool(t)`, `if t > 0`, and the data-dependent sizes of `unique`,
`nonzero` and boolean indexing) stops the host until the device has finished all queued work. A CPU cannot show a
sync, but the `meta` device can: its tensors have shapes and no data, so every read of a value raises. The model is
a small stand-in with StepContext's interface, because transformers' BERT itself reads its attention mask
(`padding_mask.all()` when it builds the mask), which is the model's sync, not the strategy's.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import make_ctx
from torch.overrides import TorchFunctionMode

import clue_adv
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


# --------------------------------------------------------------------------------------------------
# The loop itself: its own host reads, once per read point, and a non-finite step skipped on the device

HOST_READS = {"__float__", "__int__", "__bool__", "__index__", "__complex__", "item", "tolist", "numpy", "cpu"}
CLUE_ADV = Path(clue_adv.__file__).parent
# The training loop's code: the recipe, its state, its progress bar, and the strategies. Evaluation (evaluate.py)
# and data loading (CPU tensors) are not the training step's; BERT's own mask read is transformers'.
LOOP_FILES = {CLUE_ADV / "train.py", CLUE_ADV / "runstate.py", CLUE_ADV / "progress.py", CLUE_ADV / "regularizers"}


class LoopReads(TorchFunctionMode):
    """Counts reads of a tensor's value on the host, by the clue_adv file and line that made them (the first frame
    outside torch), for `files` (default: the training loop's)."""

    def __init__(self, files: set[Path] = LOOP_FILES) -> None:
        super().__init__()
        self.files = files
        self.reads: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            frame, loading = sys._getframe(1), False
            while frame is not None and Path(frame.f_code.co_filename).is_relative_to(TORCH):
                loading |= Path(frame.f_code.co_filename).is_relative_to(TORCH / "utils" / "data")
                frame = frame.f_back
            source = Path(frame.f_code.co_filename) if frame is not None else None
            # the DataLoader's sampler reads its CPU tensors: the host's own work, not a wait for the device
            if not loading and source is not None and any(source == f or source.is_relative_to(f) for f in self.files):
                self.reads[f"{source.name}:{frame.f_lineno} {func.__name__}"] += 1
        return func(*args, **(kwargs or {}))


TORCH = Path(torch.__file__).parent


def test_the_loop_reads_the_device_once_per_window_and_evaluation(tmp_path):
    """12 steps (4 an epoch: 8 micro-batches of 32, accumulation 2), log lines every 3 steps, evaluations every 5
    and at epoch ends: the loop reads its steps' losses, gradient norms and a strategy's two metrics once at each of
    those points and after the run's first step (timed alone), nowhere else: it used to read each micro-batch's loss
    and each step's gradient norm, and to synchronize the GPU after each step."""
    from conftest import smoke_config

    from clue_adv.train import train

    cfg = smoke_config(
        strategy={"name": "consistency"},  # two metrics per micro-batch
        data__max_train_samples=256,
        data__max_eval_samples=32,
        optim__grad_accum_steps=2,
        epochs=3,
        log_every_n_steps=3,
        eval__every_n_steps=5,
    )
    counter = LoopReads()
    with counter:
        outcome = train(cfg, tmp_path, show_progress=False)
    assert outcome.summary["status"] == "completed" and outcome.summary["steps"] == 12
    read_points = {1} | {step for step in range(1, 13) if step % 3 == 0 or step % 5 == 0 or step % 4 == 0}
    assert read_points == {1, 3, 4, 5, 6, 8, 9, 10, 12}
    assert len(counter.reads) == 1, counter.reads
    [(where, count)] = counter.reads.items()  # one place reads, as one tolist of everything unread
    assert where.startswith("runstate.py:") and where.endswith(" tolist"), counter.reads
    assert count == len(read_points), counter.reads
    lines = [json.loads(line) for line in (outcome.directory / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["type"] == "train"]
    assert [line["step"] for line in train_lines] == [3, 6, 9, 12]
    keys = {"type", "epoch", "step", "lr", "grad_norm", "step_time_s", "loss", "divergence", "noisy_loss"}
    assert all(set(line) == keys for line in train_lines), train_lines


def test_the_loop_reads_what_it_used_to_read_one_by_one(tmp_path):
    """The values read together are the values read one at a time: a log line's loss is the mean of its micro-batch
    losses, its grad_norm the last step's clipping norm, and the final training loss the epoch's example-weighted
    mean; checked against a recording of each train_step's device values, read separately here."""
    from conftest import smoke_config

    import clue_adv.train as train_module
    from clue_adv.train import train

    outputs = []
    original = train_module.train_step

    def recording(*args, **kwargs):
        out = original(*args, **kwargs)
        outputs.append(out)
        return out

    cfg = smoke_config(data__max_train_samples=160, batch_size=16, optim__grad_accum_steps=3, log_every_n_steps=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_module, "train_step", recording)
        outcome = train(cfg, tmp_path, show_progress=False)
    # 10 micro-batches: windows of 3, 3, 3 and 1
    assert [out.sizes for out in outputs] == [[16, 16, 16]] * 3 + [[16]]
    losses = [[float(loss) for loss in out.losses] for out in outputs]
    lines = [json.loads(line) for line in (outcome.directory / "metrics.jsonl").read_text().splitlines()]
    train_lines = [line for line in lines if line["type"] == "train"]
    assert [line["step"] for line in train_lines] == [2, 4]
    for line, steps in zip(train_lines, [(0, 1), (2, 3)], strict=True):
        window = [loss for k in steps for loss in losses[k]]
        assert line["loss"] == sum(window) / len(window)
        assert line["grad_norm"] == float(outputs[steps[-1]].grad_norm)
    epoch_loss = sum(loss * 16 for step in losses for loss in step) / 160  # every micro-batch holds 16 examples
    assert outcome.summary["final_train_loss"] == pytest.approx(epoch_loss, rel=1e-12)


def _snapshot(learner) -> dict[str, torch.Tensor]:
    state = {f"param/{n}": p.detach().clone() for n, p in learner.model.named_parameters()}
    for k, (p, s) in enumerate(learner.optimizer.state.items()):
        state |= {f"optim/{k}/{key}": v.clone() for key, v in s.items() if isinstance(v, torch.Tensor)}
    return state


def test_a_non_finite_step_is_skipped_on_the_device_and_failed_with_its_step_at_the_next_read(tmp_path, monkeypatch):
    """Step 6 of a window 5-8 has non-finite gradients: its update is skipped on the device (weights, AdamW moments
    and step count stay as step 5 left them; nothing read on the host), steps 7 and 8 run, and the read at step 8 fails
    the run at step 6, as the old per-step check did: summary, metrics.jsonl and the step count say step 6."""
    from conftest import smoke_config

    import clue_adv.train as train_module
    from clue_adv.errors import RunFailed
    from clue_adv.train import train

    snapshots = []
    original_step, original_build = train_module.train_step, train_module.build_model

    def recording(learner, *args, **kwargs):
        out = original_step(learner, *args, **kwargs)
        snapshots.append(_snapshot(learner))
        return out

    def poisoned(*args, **kwargs):
        model = original_build(*args, **kwargs)
        poison = lambda grad: grad * float("nan") if len(snapshots) == 5 else grad  # noqa: E731 (during step 6)
        model.classifier.weight.register_hook(poison)
        return model

    monkeypatch.setattr(train_module, "train_step", recording)
    monkeypatch.setattr(train_module, "build_model", poisoned)
    with pytest.raises(RunFailed, match="non-finite gradient norm at step 6"):
        train(smoke_config(log_every_n_steps=4), tmp_path, show_progress=False)
    assert len(snapshots) == 8  # found at the window's read
    fifth, sixth, seventh = snapshots[4], snapshots[5], snapshots[6]
    assert fifth.keys() == sixth.keys() and any(k.startswith("optim/") for k in fifth)
    assert all(torch.equal(fifth[k], sixth[k]) for k in fifth), [
        k for k in fifth if not torch.equal(fifth[k], sixth[k])
    ]
    assert not all(torch.equal(sixth[k], seventh[k]) for k in sixth)  # step 7 trained again
    assert all(bool(v.isfinite().all()) for v in snapshots[-1].values())
    directory = tmp_path / "test" / "tnews" / "none" / "seed-1"
    summary = json.loads((directory / "summary.json").read_text())
    assert summary["failed_step"] == 6 and summary["failed_quantity"] == "gradient norm" and summary["steps"] == 5
    assert summary["error"] == "non-finite gradient norm at step 6"
    lines = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines if line["type"] == "train"] == [4]  # step 8's line is never written


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("poison", ["loss", "gradient"])
def test_train_step_skips_a_non_finite_update_with_any_optimizer(batch, fused, poison):
    """AdamW fused (build_optimizer's: skipped on the device) or not (the flag read on the host): a step with a
    non-finite loss or gradient leaves weights and optimizer state as they were and says which it was; a finite
    step after it trains."""
    from conftest import tiny_bert

    from clue_adv.regularizers.none import NoneConfig, NoRegularizer
    from clue_adv.runstate import NONFINITE_GRADIENT, NONFINITE_LOSS, Learner
    from clue_adv.train import train_step

    model = tiny_bert(dropout=0.0)
    learner = Learner(model, NoRegularizer(NoneConfig()), torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused))
    assert train_step(learner, [batch]).nonfinite == 0
    before = _snapshot(learner)
    if poison == "gradient":
        handle = model.classifier.weight.register_hook(lambda grad: grad * float("inf"))
    else:
        handle = model.classifier.register_forward_hook(lambda module, args, out: out * float("nan"))
    out = train_step(learner, [batch])
    handle.remove()
    assert int(out.nonfinite) == (NONFINITE_GRADIENT if poison == "gradient" else NONFINITE_LOSS)
    after = _snapshot(learner)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert train_step(learner, [batch]).nonfinite == 0
    assert not all(torch.equal(after[k], v) for k, v in _snapshot(learner).items())


def test_step_times_are_window_means_and_the_first_step_is_timed_alone():
    """LoopState.read books a window's seconds: the log line's step_time_s is their mean per step; the run's first
    step (read alone) is kept out of mean_step_time_s, which it used to be per step."""
    from clue_adv.runstate import LoopState, ReadStep

    def steps(n):
        return [ReadStep([1.0], {}, 0.5, 0, [8]) for _ in range(n)]

    state = LoopState()
    for n, seconds in [(1, 9.0), (3, 6.0), (4, 4.0)]:
        for _ in range(n):
            state.step += 1
        state.read(steps(n), seconds)
    assert state.first_step_s == 9.0 and state.timed_steps == 8
    assert state.last_step["step_time_s"] == 1.0
    assert state.mean_step_time_s == pytest.approx(10.0 / 7)


def test_an_evaluation_reads_the_device_once_and_gets_the_numbers_by_hand(tokenizer):
    """Three batches: accuracy, macro-F1 and the mean loss equal a computation from each example's logits (F1 per
    class from its own true/false positives, classes present only), and evaluate() read the device once at its end;
    it used to read each batch's loss and copy its predictions and labels to the host."""
    import torch.nn.functional as F
    from conftest import SENTENCES, tiny_bert

    from clue_adv.evaluate import evaluate

    model = tiny_bert(6, dropout=0.0, seed=3)
    labels = [[0, 1, 2, 0], [4, 4, 0, 1], [2, 0]]  # 3 and 5 never true: they count only where predicted
    batches = []
    for k, ys in enumerate(labels):
        texts = [SENTENCES[(k + i) % 4] + "的" * i for i in range(len(ys))]
        enc = dict(tokenizer(texts, padding=True, return_tensors="pt"))
        batches.append({**enc, "labels": torch.tensor(ys)})
    counter = LoopReads({CLUE_ADV / "evaluate.py"})
    with counter:
        got = evaluate(model, batches, torch.device("cpu"), 6)
    assert sum(counter.reads.values()) == 1, counter.reads

    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches])
    gold = [y for ys in labels for y in ys]
    predicted = logits.argmax(-1).tolist()
    f1 = []
    for c in range(6):
        tp = sum(p == c and g == c for p, g in zip(predicted, gold, strict=True))
        fp = sum(p == c and g != c for p, g in zip(predicted, gold, strict=True))
        fn = sum(p != c and g == c for p, g in zip(predicted, gold, strict=True))
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    losses = F.cross_entropy(logits.double(), torch.tensor(gold), reduction="none")
    assert got["examples"] == 10
    assert got["accuracy"] == sum(p == g for p, g in zip(predicted, gold, strict=True)) / 10
    assert got["macro_f1"] == pytest.approx(sum(f1) / len(f1), abs=1e-12)
    assert got["loss"] == pytest.approx(float(losses.mean()), rel=1e-6)
    assert model.training is False  # it was in eval mode before: left as it was
