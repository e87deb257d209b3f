"""scripts/estimate_reproduce.py: its FLOP arithmetic, its scaling, and that it batches as clue_adv does.

Fast (a few seconds): a meta-device model, the bundled data sample (tokenized once per module), no training.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import load_script

from clue_adv.regularizers.base import StepCost

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
REPO = SCRIPTS.parent


@pytest.fixture(scope="module")
def est():
    return load_script("estimate_reproduce")


@pytest.fixture(scope="module")
def cells(est):
    return est.plan_cells(REPO / "sweeps" / "reproduce.yaml")


@pytest.fixture(scope="module")
def estimator(est, tmp_path_factory):
    # An empty data root: the counter falls back to the bundled sample (small, fast, always present).
    tokens = est.TokenCounter(tmp_path_factory.mktemp("no-clue-data"), sim_epochs=1)
    return est.Estimator(tokens, double_backward_weight=2.0)


def test_flops_of_a_tiny_config_match_the_hand_formula(est):
    L, d, ff, C = 2, 32, 64, 3
    config = est.bert_config(
        {"num_hidden_layers": L, "hidden_size": d, "intermediate_size": ff, "num_attention_heads": 2}, num_labels=C
    )
    # Per layer: Q, K, V, O (d×d + bias), FFN in (d×ff + bias) and out (ff×d + bias), two LayerNorms (2·d each).
    per_layer = 4 * (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * 2 * d
    pooler = est.model_flops(config, head="pooler")
    cls = est.model_flops(config, head="cls")
    assert pooler.token_params == cls.token_params == L * per_layer
    assert pooler.sequence_params == (d * d + d) + (d * C + C)  # tanh pooler + classifier
    assert cls.sequence_params == d * C + C  # the study's head: the classifier on [CLS] only

    # One batch of B examples padded to s: 6·N·B·s + 12·L·d·B·s² + 6·N_seq·B.
    B, s = 4, 16
    expected = 6 * L * per_layer * B * s + 12 * L * d * B * s * s + 6 * (d * C + C) * B
    assert cls.train_flops(B * s, B * s * s, B) == expected
    assert cls.forward_flops(B * s, B * s * s, B) == pytest.approx(expected / 3)


def test_bert_base_has_the_known_non_embedding_count(est):
    # bert-base: 12 layers of 7,087,872 parameters each (the bundled config.json is bert-base-chinese's).
    assert est.model_flops(est.bert_config(num_labels=15), head="cls").token_params == 12 * 7_087_872


def test_doubling_epochs_doubles_the_estimate(est, cells, estimator):
    for cell in (cells[0], cells[-1]):  # iflytek and tnews
        once = estimator.cost(cell)
        twice = estimator.cost(replace(cell, epochs=2 * cell.epochs))
        assert once.total_flops > 0
        assert twice.total_flops == pytest.approx(2 * once.total_flops, rel=1e-12)
        assert twice.steps == 2 * once.steps
        assert est.seconds(twice.total_flops, 0.35) == pytest.approx(2 * est.seconds(once.total_flops, 0.35))


def test_two_forward_two_backward_costs_twice_none(est, cells, estimator):
    none = next(c for c in cells if c.cost == StepCost(forward=1, backward=1))
    two = replace(none, cost=StepCost(forward=2, backward=2))
    base, double = estimator.cost(none), estimator.cost(two)
    assert double.train_flops_per_epoch == pytest.approx(2 * base.train_flops_per_epoch, rel=1e-12)
    # Evaluation is one forward per epoch whatever the strategy, so the whole run is a little under 2×.
    assert 1.9 < double.total_flops / base.total_flops < 2.0
    # The shipped FGM cell declares exactly these passes.
    fgm = next(c for c in cells if c.strategy == "fgm-study" and c.task == none.task and c.seed == none.seed)
    assert estimator.cost(fgm).total_flops == pytest.approx(double.total_flops, rel=1e-12)


def test_double_backward_is_counted_with_its_stated_weight(est):
    gp = StepCost(forward=1, backward=2, double_backward=True)
    assert est.step_multiplier(StepCost(1, 1)) == 1.0
    assert est.step_multiplier(gp, 2.0) == pytest.approx((1 + 2 * 2 + 2) / 3)  # one backward counted twice
    assert est.step_multiplier(gp, 1.0) == pytest.approx(5 / 3)  # ... or as a plain backward
    assert est.analytic_step_multiplier(gp) == pytest.approx(2.0)


def test_the_plan_is_the_shipped_grid(cells):
    assert len(cells) == 30
    assert {c.task for c in cells} == {"tnews", "iflytek"}
    assert {c.strategy for c in cells} == {"none", "fgm-study", "gp-study"}
    assert {(c.epochs, c.batch_size, c.max_length, c.head) for c in cells} == {(50, 32, 128, "cls")}


def test_clue_protocol_takes_the_baseline_settings(est, cells):
    clue = est.clue_protocol(cells[0])
    assert (clue.epochs, clue.head, clue.strategy, clue.seed) == (3, "pooler", cells[0].strategy, cells[0].seed)


@pytest.mark.parametrize("grouped", [False, True])
def test_simulated_batches_match_the_project_loader(est, tokenizer, grouped):
    """The padded token counts come from the same batches clue_adv.data.train_loader makes on CUDA."""
    sys.path.insert(0, str(SCRIPTS))
    import _bench_common as common
    from datasets import Dataset

    from clue_adv.data import ASSETS, read_split, train_loader

    sentences = read_split(ASSETS / "tnews" / "train.json", None)["sentence"][:400]
    enc = tokenizer(sentences, truncation=True, max_length=128)
    ds = Dataset.from_dict({**enc, "labels": [0] * len(sentences)})
    # Batch 4: the 400 examples span two length-grouping windows (50 batches each), so the window size matters.
    cfg = common.run_config(batch_size=4, seed=3, data={"length_grouped": grouped})
    loader = train_loader(ds, tokenizer, cfg, pad_to_multiple_of=8)
    lengths = [len(ids) for ids in enc["input_ids"]]
    orders = est.train_epoch_orders(lengths, cfg.batch_size, grouped, cfg.seed, epochs=2)
    for order in orders:  # two epochs: the generator carries over between epochs in both
        shapes = [tuple(batch["input_ids"].shape) for batch in loader]
        counted = est.batch_tokens(lengths, order, cfg.batch_size, 8)
        assert counted.batches == len(shapes)
        assert counted.padded_tokens == sum(b * s for b, s in shapes)
        assert counted.padded_tokens_x_length == sum(b * s * s for b, s in shapes)


def test_tiling_keeps_the_size_and_the_distribution(est):
    lengths = [10, 20, 30]
    tiled = est.tile_to(lengths, 10)
    assert len(tiled) == 10
    assert sorted(tiled[:9]) == sorted(lengths * 3)
    assert tiled[9] in lengths
    assert est.padded_length(17) == 24 and est.padded_length(16) == 16 and est.padded_length(17, None) == 17


def test_a_pass_on_a_stacked_batch_counts_its_examples(est):
    """StepCost.batch_factor: one forward + backward of the batch stacked twice costs two plain steps."""
    stacked = StepCost(1, 1, batch_factor=2)
    assert est.step_multiplier(stacked) == pytest.approx(2.0)
    assert est.analytic_step_multiplier(stacked) == pytest.approx(2.0)
    stacked_gp = StepCost(1, 2, double_backward=True, batch_factor=2)
    single_gp = StepCost(1, 2, double_backward=True)
    assert est.analytic_step_multiplier(stacked_gp) == pytest.approx(2 * est.analytic_step_multiplier(single_gp))
    assert est.step_multiplier(StepCost(1, 1, batch_factor=3)) == pytest.approx(3.0)
    assert est.step_multiplier(stacked_gp, 2.0) == pytest.approx(2 * est.step_multiplier(single_gp, 2.0))


# --------------------------------------------------------------------------------------------------
# Early stopping: epochs to the best dev epoch from scripts/early_stopping_fidelity.py's JSON


def _fidelity(tmp_path, runs: list[tuple[str, int, int]]) -> Path:
    """A fidelity JSON as scripts/early_stopping_fidelity.py writes it: (strategy tag, epochs, best epoch) per run,
    each with a replayed stop per patience (here: best + patience, capped by the run's epochs)."""
    body = {
        "patience": [{"patience": 3, "runs": len(runs), "found": 2, "mean_lost_points": 0.5, "max_lost_points": 1.0}],
        "runs": [
            {
                "run": f"r{i}",
                "strategy": tag,
                "epochs": epochs,
                "best_epoch": best,
                **{f"patience_{p}": {"stop_epoch": min(epochs, best + p)} for p in (3, 5)},
            }
            for i, (tag, epochs, best) in enumerate(runs)
        ],
    }
    path = tmp_path / "early-stopping.json"
    path.write_text(json.dumps(body))
    return path


# none: 3 runs, best epochs 2, 4, 7 (median 4). fgm-study: exact runs 3 and 6 (median 4.5, rounded up: 5) beside a
# strength variant with best epoch 9 (not used: exact runs exist). gp-study maps to the proxy's `gp`, which has only
# strength variants: best epochs 1 and 2 (median 1.5 -> 2). rdrop: no proxy run of its own nor variants.
PROXY_RUNS = [
    ("none", 10, 2),
    ("none", 10, 4),
    ("none", 12, 7),
    ("fgm-study", 10, 3),
    ("fgm-study", 10, 6),
    ("fgm-study-epsilon=0.03", 10, 9),
    ("gp-epsilon=1.0", 10, 1),
    ("gp-epsilon=0.1", 10, 2),
    ("fgm-sum", 10, 8),  # not a variant of fgm-study (no `=`), nor of fgm
]


def test_proxy_runs_are_matched_exact_then_variants_then_all(est, tmp_path):
    runs, rows = est.read_fidelity(_fidelity(tmp_path, PROXY_RUNS))
    assert len(runs) == 9 and rows[0]["found"] == 2
    assert runs[2].stops == {3: 10, 5: 12}
    proxy, how, matched = est.proxy_runs_for("fgm-study", runs)
    assert (proxy, how, [r.best_epoch for r in matched]) == ("fgm-study", "exact", [3, 6])
    proxy, how, matched = est.proxy_runs_for("gp-study", runs)
    assert (proxy, how, sorted(r.best_epoch for r in matched)) == ("gp", "variants", [1, 2])
    proxy, how, matched = est.proxy_runs_for("rdrop", runs)
    assert (proxy, how, len(matched)) == ("rdrop", "all runs", 9)
    # by hand: the median of 2, 4, 7 is 4; of 3, 6 is 4.5 -> 5 epochs; of 1, 2 is 1.5 -> 2; of all nine
    # (1, 2, 2, 3, 4, 6, 7, 8, 9) is 4
    assert [est.epochs_to_best(est.proxy_runs_for(t, runs)[2]) for t in ("none", "fgm-study", "gp-study", "x")] == [
        4,
        5,
        2,
        4,
    ]


def test_early_stopping_epochs_and_flops_match_a_hand_computation(est, cells, estimator, tmp_path):
    runs, _ = est.read_fidelity(_fidelity(tmp_path, PROXY_RUNS))
    strategies = est.early_stopping_strategies(cells, runs, [3, 5, 48])
    # min(50, epochs to best + patience): none 4 + 3, fgm-study 5 + 3, gp-study 2 + 3; capped at 50 for 48
    assert {t: s["epochs"] for t, s in strategies.items()} == {
        "none": {"3": 7, "5": 9, "48": 50},
        "fgm-study": {"3": 8, "5": 10, "48": 50},
        "gp-study": {"3": 5, "5": 7, "48": 50},
    }
    assert strategies["none"]["max_best_epoch"] == 7 and strategies["none"]["replayed_stop_epochs"]["5"] == [7, 9, 12]
    assert strategies["gp-study"]["matched"] == "variants" and not strategies["gp-study"]["fallback"]
    hand = {"none": 7, "fgm-study": 8, "gp-study": 5}
    stopped = est.early_stopping_cells(cells, strategies, 3)
    assert [c.epochs for c in stopped] == [hand[c.strategy] for c in cells]
    # Every cost is per epoch: the stopped grid costs each full cell's FLOPs times its epochs / 50.
    expected = sum(estimator.cost(c).total_flops * hand[c.strategy] / 50 for c in cells)
    assert sum(estimator.cost(c).total_flops for c in stopped) == pytest.approx(expected, rel=1e-12)


def test_a_strategy_without_proxy_runs_falls_back_to_all_runs_with_a_flag(est, cells, tmp_path):
    runs, _ = est.read_fidelity(_fidelity(tmp_path, [("none", 10, 3), ("none", 10, 9)]))
    strategies = est.early_stopping_strategies(cells, runs, [5])
    assert strategies["none"]["fallback"] is False
    assert strategies["gp-study"]["fallback"] is True and strategies["gp-study"]["epochs_to_best"] == 6
    assert strategies["gp-study"]["epochs"] == {"5": 11}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read it"),
        ("{not json", "not JSON"),
        ('{"runs": []}', "no `runs` list"),
        ('{"runs": [{"strategy": "none", "epochs": 10, "best_epoch": 0}]}', "runs[0] lacks"),
    ],
)
def test_a_bad_fidelity_file_is_one_message_and_exit_2(est, tmp_path, capsys, content, message):
    path = tmp_path / "es.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        est.parse_args(["--early-stopping", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--early-stopping {path}: " in err and message in err


def test_the_report_shows_the_early_stopping_scenarios(est, tmp_path, monkeypatch):
    """End to end on the bundled sample: the headline line, a totals row per patience, the per-strategy table."""
    fidelity = _fidelity(tmp_path, PROXY_RUNS)
    args = est.parse_args(
        ["--data-root", str(tmp_path / "none"), "--sim-epochs", "1", "--early-stopping", str(fidelity)]
    )
    payload = est.build_payload(args, {"command": "x"})
    monkeypatch.setattr(est.common, "machine_markdown", lambda info: [])
    text = est.markdown(payload)
    es = payload["early_stopping"]["scenarios"]
    assert list(es) == ["3", "5"] and es["3"]["epochs"] == [5, 7, 8]
    shipped = payload["scenarios"]["as_shipped/configured"]
    assert es["3"]["total_pflop"] < es["5"]["total_pflop"] < shipped["total_pflop"]
    assert "- With **early stopping**" in text and "kept the full run's best epoch in 2 of 9" in text
    assert "| as shipped + early stopping, patience 3 | random (as configured) | 5/7/8 | 30 |" in text
    assert "| gp-study | 2 × gp-epsilon=0.1, gp-epsilon=1.0 (strength variants of gp) | 1, 2 | 1.5 → 2 | 2 |" in text
    # without the option, no trace of it
    plain = est.markdown(est.build_payload(est.parse_args(["--data-root", str(tmp_path / "none")]), {}))
    assert "early stopping" not in plain.lower()
