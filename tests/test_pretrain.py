"""`clue-adv pretrain`: BERT's masking, logits at the targets only, resume, the output model fine-tunes, bad input."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SENTENCES, TOKENIZER_DIR, smoke_config, tnews_labels
from typer.testing import CliRunner

from clue_adv.cli import app
from clue_adv.data import ASSETS
from clue_adv.pretrain.config import MaskingConfig, load_pretrain_config, parse_pretrain_config
from clue_adv.pretrain.masking import IGNORE, Masker, pad
from clue_adv.pretrain.mlm import MlmBatch, masked_logits, mlm_loss
from clue_adv.pretrain.run import lr_factor, pretrain

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs" / "pretrain").glob("*.yaml"))
# bert-base-chinese's special tokens, written out (not read from the tokenizer the code under test reads)
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
SPECIAL = {PAD, UNK, CLS, SEP, MASK}
TINY = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}
BASE = {
    "experiment": "pt",
    "task": "tnews",
    "data": {"path": str(ASSETS / "tnews"), "max_texts": 200, "heldout_fraction": 0.1},
    "model": {"name_or_path": str(TOKENIZER_DIR), "init": "random", "architecture": TINY},
    "max_length": 32,
    "batch_size": 16,
    "max_steps": 6,
    "optim": {"lr": 1e-3},
    "eval": {"every_n_steps": 3, "batch_size": 64},
    "log_every_n_steps": 1,
    "checkpoint_every_n_steps": 4,
    "checkpoint_every_minutes": 1000,
}
runner = CliRunner()


def config_dict(**fields) -> dict:
    """BASE with dotted-key overrides (`data.max_texts=...`)."""
    data = copy.deepcopy(BASE)
    for dotted, value in fields.items():
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        if value is None:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return data


def config(**fields):
    return parse_pretrain_config(config_dict(**fields))


def config_file(tmp_path: Path, **fields) -> Path:
    f = tmp_path / "pretrain.yaml"
    f.write_text(yaml.safe_dump(config_dict(**fields), allow_unicode=True), encoding="utf-8")
    return f


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------------
# Masking


@pytest.fixture(scope="module")
def tnews_ids(tokenizer) -> list[list[int]]:
    lines = (ASSETS / "tnews" / "train.json").read_text(encoding="utf-8").splitlines()[:3000]
    texts = [json.loads(line)["sentence"] for line in lines]
    return tokenizer(texts, truncation=True, max_length=48)["input_ids"]


def test_masking_follows_berts_recipe_on_real_text(tokenizer, tnews_ids):
    input_ids, attention = pad(tnews_ids, PAD)
    inputs, labels = Masker(tokenizer, MaskingConfig())(input_ids, attention, torch.Generator().manual_seed(1))
    targets = labels != IGNORE
    for row, seq in enumerate(tnews_ids):
        maskable = sum(t not in SPECIAL for t in seq)
        # BERT's create_pretraining_data: max(1, round(len * 0.15)) targets per text (Python's round)
        assert int(targets[row].sum()) == max(1, round(maskable * 0.15)), row
    originals = input_ids[targets]
    assert torch.equal(labels[targets], originals)  # a target's label is its original token
    assert not any(int(t) in SPECIAL for t in originals)  # [CLS], [SEP], [UNK], padding are never targets
    assert torch.equal(inputs[~targets], input_ids[~targets])  # nothing else changes
    replaced = inputs[targets]
    as_mask = replaced == MASK
    kept = replaced == originals
    randomised = ~as_mask & ~kept
    n = int(targets.sum())
    for share, expected in ((as_mask, 0.8), (randomised, 0.1), (kept, 0.1)):
        sigma = (expected * (1 - expected) / n) ** 0.5
        assert abs(float(share.double().mean()) - expected) < 4 * sigma, (expected, float(share.double().mean()))
    assert not any(int(t) in SPECIAL for t in replaced[randomised])  # random replacements are real tokens
    assert len(set(replaced[randomised].tolist())) > 0.5 * int(randomised.sum())  # spread over the vocabulary


def test_targets_are_chosen_uniformly_among_the_maskable_positions(tokenizer):
    from scipy.stats import chisquare

    rows, length = 3000, 20
    body = torch.randint(1000, 20000, (rows, length), generator=torch.Generator().manual_seed(0))
    seqs = [[CLS, *r.tolist(), SEP] for r in body]
    seqs[::2] = [s + [PAD] * 5 for s in seqs[::2]]  # padded rows too: padding must not shift the choice
    input_ids, attention = pad(seqs, PAD)
    attention[::2, length + 2 :] = 0
    _, labels = Masker(tokenizer, MaskingConfig())(input_ids, attention, torch.Generator().manual_seed(2))
    chosen = (labels != IGNORE)[:, 1 : length + 1]
    assert (labels != IGNORE).sum(1).eq(3).all()  # round(20 * 0.15) = 3 per row
    counts = chosen.sum(0).double()
    assert chisquare(counts.numpy()).pvalue > 1e-3, counts  # every position as likely as any other


# ------------------------------------------------------------------------------------------------------
# Logits at the targets only


def test_logits_are_computed_at_the_targets_only_and_equal_the_full_computation(tokenizer):
    from transformers import AutoConfig, BertForMaskedLM

    torch.manual_seed(0)
    config_ = AutoConfig.from_pretrained(TOKENIZER_DIR, **{**TINY, "num_hidden_layers": 2})
    model = BertForMaskedLM(config_).eval()  # no dropout: both computations see the same network
    enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    inputs, labels = Masker(tokenizer, MaskingConfig())(
        enc["input_ids"], enc["attention_mask"], torch.Generator().manual_seed(0)
    )
    rows: list[tuple[int, ...]] = []
    hook = model.cls.predictions.decoder.register_forward_hook(lambda m, i, o: rows.append(tuple(i[0].shape)))
    logits, targets = masked_logits(model, inputs, enc["attention_mask"], labels)
    hook.remove()
    n = int((labels != IGNORE).sum())
    assert rows == [(n, 32)]  # the vocabulary projection saw the n targets, nothing else
    full = model(input_ids=inputs, attention_mask=enc["attention_mask"]).logits
    torch.testing.assert_close(logits, full[labels != IGNORE])
    assert torch.equal(targets, labels[labels != IGNORE])

    # The loss and its gradients equal Hugging Face's loss over all positions (targets only count there).
    def grads(loss: torch.Tensor) -> dict[str, torch.Tensor]:
        model.zero_grad()
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    ours = mlm_loss(model, MlmBatch(inputs, enc["attention_mask"], labels)).loss
    theirs = model(input_ids=inputs, attention_mask=enc["attention_mask"], labels=labels).loss
    torch.testing.assert_close(ours, theirs)
    g_ours, g_theirs = grads(ours), grads(theirs)
    assert g_ours.keys() == g_theirs.keys()
    for key in g_theirs:
        torch.testing.assert_close(g_ours[key], g_theirs[key], rtol=1e-4, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------------------------
# The run: schedule, resume, output


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """An uninterrupted 6-step pretrain, the reference for the resumed ones."""
    return pretrain(config(), tmp_path_factory.mktemp("whole"), show_progress=False)


def test_learning_rates_follow_hugging_faces_linear_schedule(whole_run):
    from transformers import get_linear_schedule_with_warmup

    total, ratio = 50, 0.1  # warmup of 5 steps
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = get_linear_schedule_with_warmup(optimizer, round(ratio * total), total)
    expected = []
    for _ in range(total):
        expected.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert [lr_factor(s / total, ratio, "linear") for s in range(total)] == pytest.approx(expected)
    # and the loop uses them: 6 steps, warmup round(0.06 * 6) -> the share of the budget before each update
    lrs = [r["lr"] for r in records(whole_run.directory) if r["type"] == "train"]
    assert lrs == pytest.approx([1e-3 * lr_factor(s / 6, 0.06, "linear") for s in range(6)])


def test_accumulated_micro_batches_give_the_gradient_of_the_mean_over_all_their_targets(tmp_path):
    import torch.nn.functional as F

    from clue_adv.pretrain.run import _Pretrain, _Window

    cfg = config(**{"optim.grad_accum_steps": 2, "data.length_grouped": False})
    run = _Pretrain(cfg, tmp_path / "run", resume=False)  # sets up, writes nothing
    run.step, run.counters = 0, {"tokens_seen": 0, "targets_seen": 0}
    run.model.eval()  # no dropout: both computations see the same network
    loss = run._accumulate(_Window())
    ours = {k: p.grad.clone() for k, p in run.model.named_parameters() if p.grad is not None}
    run.model.zero_grad(set_to_none=True)
    # independently: one cross-entropy over the targets of both micro-batches together
    parts = [masked_logits(run.model, b.input_ids, b.attention_mask, b.labels) for b in (run.batch(0), run.batch(1))]
    assert parts[0][1].numel() != parts[1][1].numel()  # unequal shares: a plain average of the two means differs
    whole = F.cross_entropy(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    whole.backward()
    assert loss == pytest.approx(float(whole.detach()), rel=1e-5)
    for name, p in run.model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(ours[name], p.grad, rtol=1e-4, atol=1e-7, msg=name)
    assert not (tmp_path / "run").exists()


def test_a_completed_pretrain_leaves_a_model_and_no_checkpoint(whole_run):
    s = whole_run.summary
    assert s["status"] == "completed" and s["steps"] == 6
    assert not (whole_run.directory / "checkpoint").exists()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in whole_run.model_dir.iterdir()}
    evals = [r for r in records(whole_run.directory) if r["type"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert evals[-1]["loss"] < evals[0]["loss"]  # it learns something even in 6 steps
    assert s["texts"]["heldout"] == 20 and s["texts"]["train"] == 180  # 10% of 200 texts held out


def test_a_non_finite_loss_fails_the_pretrain_with_its_step(tmp_path, monkeypatch):
    """Pretraining raises NonFiniteError(step, quantity): it used to be built with the fine-tuning loop's one
    argument, so a diverged pretrain died of a TypeError instead of a failed run naming its step."""
    import clue_adv.pretrain.run as run_module
    from clue_adv.errors import RunFailed

    original, calls = run_module.mlm_loss, []

    def nan_in_step_3(*args, **kwargs):
        calls.append(1)
        result = original(*args, **kwargs)
        if len(calls) == 3:
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(run_module, "mlm_loss", nan_in_step_3)
    with pytest.raises(RunFailed, match="non-finite loss at step 3"):
        pretrain(config(), tmp_path, show_progress=False)
    summary = json.loads((tmp_path / "pt" / "tnews" / "mlm-seed-1" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["failed_step"] == 3 and summary["failed_quantity"] == "loss"


@pytest.mark.parametrize("how", ["ctrl-c", "crash", "kill-between-renames"])
def test_an_interrupted_pretrain_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, whole_run, how):
    import clue_adv.pretrain.run as run_module

    original, calls = run_module.mlm_loss, []

    def stop_in_step_6(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # the sixth training micro-batch: in the middle of step 6
            raise RuntimeError("simulated crash") if how == "crash" else KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(run_module, "mlm_loss", stop_in_step_6)
    with pytest.raises(RuntimeError if how == "crash" else KeyboardInterrupt):
        pretrain(config(), tmp_path, show_progress=False)
    run = tmp_path / "pt" / "tnews" / "mlm-seed-1"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == ("failed" if how == "crash" else "interrupted")
    # Ctrl-C saves the state it stopped in (after step 5); a crash leaves the periodic checkpoint (step 4)
    saved = 4 if how == "crash" else 5
    assert json.loads((run / "checkpoint" / "state.json").read_text())["step"] == saved
    if how == "kill-between-renames":  # as a kill -9 between replacing the checkpoint's two renames leaves it
        (run / "checkpoint").rename(run / ".checkpoint.old")
    monkeypatch.setattr(run_module, "mlm_loss", original)

    resumed = pretrain(config(), tmp_path, show_progress=False)
    assert resumed.summary["status"] == "completed" and resumed.summary["steps"] == 6
    assert resumed.summary["resumed_at_steps"] == [saved]
    want, got = tensors(whole_run.model_dir), tensors(resumed.model_dir)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want)  # the same weights, bit for bit

    def curve(run_dir: Path) -> list[tuple]:
        keys = ("type", "step", "loss", "masked_accuracy", "lr", "grad_norm")
        return [tuple(r.get(k) for k in keys) for r in records(run_dir)]

    assert curve(resumed.directory) == curve(whole_run.directory)  # every line once, the same numbers


@pytest.mark.parametrize("inherited", ["terminal", "ignored"])
def test_an_interrupt_during_an_update_is_delivered_after_it(inherited):
    """Delivered to the handler that was there before: Ctrl-C's KeyboardInterrupt, or nothing where SIGINT was
    inherited ignored (a script's background job). Set here, whatever disposition pytest itself inherited."""
    from clue_adv.errors import interrupts_deferred

    handler = signal.default_int_handler if inherited == "terminal" else signal.SIG_IGN
    previous = signal.signal(signal.SIGINT, handler)
    try:
        finished = []
        with pytest.raises(KeyboardInterrupt) if inherited == "terminal" else contextlib.nullcontext():
            with interrupts_deferred():
                os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C in the middle of the optimizer step
                time.sleep(0.05)
                finished.append("update")
        assert finished == ["update"]
        assert signal.getsignal(signal.SIGINT) is handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_completed_pretrain_is_not_rerun_and_another_config_is_refused(tmp_path, whole_run):
    out = whole_run.directory.parents[2]
    again = pretrain(config(), out, show_progress=False)
    assert again.skipped
    result = runner.invoke(app, ["pretrain", "-c", str(config_file(tmp_path, **{"optim.lr": 2e-3})), "-o", str(out)])
    assert result.exit_code == 2 and "holds a run with a different config (differs in: optim.lr)" in result.output


def test_the_output_model_loads_and_fine_tunes_offline(tmp_path, whole_run):
    from safetensors import safe_open

    from clue_adv.model import build_model

    model_dir = whole_run.model_dir
    run_yaml = tmp_path / "finetune.yaml"
    run_yaml.write_text(
        "experiment: warm\ntask: tnews\n"
        f"data: {{path: {ASSETS / 'tnews'}, max_train_samples: 64, max_eval_samples: 64}}\n"
        f"model: {{init: pretrained, name_or_path: {model_dir}}}\n"
        "max_length: 32\nepochs: 1\noptim: {lr: 1.0e-3}\n"
    )
    assert runner.invoke(app, ["validate", str(run_yaml)]).exit_code == 0
    cfg = smoke_config(model={"init": "pretrained", "name_or_path": str(model_dir)})
    classifier = build_model(cfg, tnews_labels(), needs_double_backward=False)
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        for name in ("bert.embeddings.word_embeddings.weight", "bert.encoder.layer.0.output.dense.weight"):
            assert torch.equal(classifier.state_dict()[name], f.get_tensor(name)), name  # the pretrained weights
    result = runner.invoke(app, ["train", "-c", str(run_yaml), "-o", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    done = json.loads((tmp_path / "runs" / "warm" / "tnews" / "none" / "seed-1" / "summary.json").read_text())
    assert done["status"] == "completed"


def test_a_time_budget_ends_the_run_and_decays_the_learning_rate(tmp_path):
    out = pretrain(config(**{"max_steps": None, "max_minutes": 0.03}), tmp_path, show_progress=False)
    assert out.summary["status"] == "completed" and out.summary["elapsed_s"] >= 1.8
    lrs = [r["lr"] for r in records(out.directory) if r["type"] == "train"]
    assert max(lrs) > lrs[-1] and lrs[-1] < 0.2e-3  # warmed up, then decayed towards 0 at the end of the time


def test_a_compiled_encoder_trains_and_saves_the_same_weight_names(tmp_path, whole_run):
    compiled = config(**{"max_steps": 1, "model.compile": True, "model.compile_backend": "aot_eager"})
    out = pretrain(compiled, tmp_path, show_progress=False)
    assert out.summary["status"] == "completed"
    assert tensors(out.model_dir).keys() == tensors(whole_run.model_dir).keys()  # loads like an uncompiled one


def test_pretraining_reads_only_training_text(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.json").write_text((ASSETS / "tnews" / "train.json").read_text(encoding="utf-8"), encoding="utf-8")
    for name in ("dev.json", "test.json", "labels.json"):
        (data / name).write_text("not json\n")  # read, it would fail
    out = pretrain(config(**{"data.path": str(data), "max_steps": 1}), tmp_path / "o", show_progress=False)
    assert out.summary["status"] == "completed"
    # the hub: only the train split is asked for
    import datasets

    asked = []

    def load_dataset(name, config_name=None, split=None, **kwargs):
        asked.append(split)
        return datasets.Dataset.from_dict({"sentence": ["一个标题", "另一个标题", "第三个"], "label": [0, 1, 2]})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    hub = config(**{"data.path": None, "max_steps": 1, "experiment": "hub"})
    assert pretrain(hub, tmp_path / "o", show_progress=False).summary["status"] == "completed"
    assert asked == ["train"]


def test_a_text_file_needs_no_task(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text(
        "\n".join(["今天天气很好", "", "股市大涨", "以色列大选", "上联：黄山黄河黄皮肤"]) + "\n", encoding="utf-8"
    )
    out = pretrain(
        config(**{"task": None, "data": {"text_file": str(text)}, "max_steps": 2}), tmp_path, show_progress=False
    )
    assert out.summary["status"] == "completed" and out.summary["texts"]["read"] == 4
    assert out.directory.parent.name == "text"


# ------------------------------------------------------------------------------------------------------
# Shipped configs, validate, bad input


def test_there_are_shipped_pretrain_configs():
    assert {p.name for p in SHIPPED} >= {"tnews-tiny.yaml", "tnews-bert-base.yaml"}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_pretrain_configs_validate_and_run_two_steps(path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # they name the bundled tokenizer relative to the repository
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    tiny = [
        f"data.path={ASSETS / 'tnews'}",
        "data.max_texts=64",
        f"model.name_or_path={TOKENIZER_DIR}",
        "model.init=random",
        f"model.architecture={json.dumps(TINY)}",
        "max_steps=2",
        "max_minutes=null",
        "batch_size=8",
        "max_length=32",
    ]
    out = pretrain(load_pretrain_config(path, tiny), tmp_path, show_progress=False)
    assert out.summary["status"] == "completed" and out.summary["steps"] == 2


def _bad_text(tmp_path: Path, content: bytes) -> dict:
    f = tmp_path / "bad.txt"
    f.write_bytes(content)
    return {"task": None, "data": {"text_file": str(f)}}


@pytest.mark.parametrize(
    "fields,needle",
    [
        ({"max_steps": None}, "set a budget: max_steps, max_minutes"),
        ({"mlmm": {}}, "mlmm: unknown field (did you mean 'mlm'?)"),
        ({"data.train_file": "dev.json"}, "data.train_file: 'dev.json' is an evaluation split"),
        ({"task": None}, "task: required unless data.text_file"),
        ({"model.head": "cls"}, "model.head: concerns the classifier"),
        ({"mlm.replace_mask": 0.95}, "mlm.replace_mask + mlm.replace_random is 1.05; at most 1"),
        ({"data.text_file": "/no/such/file.txt", "data.path": None}, "data.text_file: file not found: /no/such"),
        ({"data.path": "/no/such/dir"}, "data.path: directory not found: /no/such/dir"),
        ("bad-utf8", "bad.txt:2: not valid UTF-8"),
        ("one-text", "1 text(s); pretraining needs at least 2"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message_and_writes_nothing(tmp_path, fields, needle):
    if fields == "bad-utf8":
        fields = _bad_text(tmp_path, "第一行\n".encode() + b"caf\xe9\n")  # Latin-1 on line 2
    elif fields == "one-text":
        fields = _bad_text(tmp_path, "只有一行\n\n".encode())
    out = tmp_path / "out"
    result = runner.invoke(app, ["pretrain", "-c", str(config_file(tmp_path, **fields)), "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert needle in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output
    assert not out.exists()  # checked before anything is written


def test_validate_reports_a_bad_pretrain_config(tmp_path):
    bad = config_file(tmp_path, **{"data.path": str(tmp_path / "missing"), "mlm.probability": 1.5})
    result = runner.invoke(app, ["validate", str(bad)])
    assert result.exit_code == 2 and "mlm.probability: Input should be less than 1" in result.output
    missing = config_file(tmp_path, **{"data.path": str(tmp_path / "missing")})
    result = runner.invoke(app, ["validate", str(missing)])
    assert result.exit_code == 2 and f"data.path: directory not found: {tmp_path / 'missing'}" in result.output


@pytest.mark.slow
def test_sigterm_exits_130_with_a_checkpoint_and_the_rerun_resumes(tmp_path):
    cfg = config_file(tmp_path, max_steps=400, batch_size=8, max_length=16, **{"eval.every_n_steps": 1000})
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "clue_adv", "pretrain", "-c", str(cfg), "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    run = out / "pt" / "tnews" / "mlm-seed-1"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not any(r["type"] == "train" for r in _whole_records(run)):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(120) == 130, proc.stderr.read()
    summary = json.loads((run / "summary.json").read_text())
    stopped = json.loads((run / "checkpoint" / "state.json").read_text())["step"]
    assert summary["status"] == "interrupted" and stopped == summary["interrupted_step"] >= 1
    result = runner.invoke(app, ["pretrain", "-c", str(cfg), "-o", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 400 and summary["resumed_at_steps"] == [stopped]
    steps = [r["step"] for r in records(run) if r["type"] == "train"]
    assert steps == list(range(1, 401))  # every step logged once


def _whole_records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line]
