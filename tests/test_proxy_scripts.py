"""scripts/early_stopping_fidelity.py and scripts/proxy_cost.py: the arithmetic the proxy study's records rest on."""

from __future__ import annotations

import json

import yaml
from conftest import load_script


def _run(directory, accuracies, *, epochs=None, stopped=None, strategy="none", train_s=100.0, status="completed"):
    directory.mkdir(parents=True)
    history = [{"epoch": i + 1, "step": 10 * (i + 1), "accuracy": a} for i, a in enumerate(accuracies)]
    summary = {
        "status": status,
        "strategy": strategy,
        "strategy_tag": strategy,
        "epochs": epochs or len(accuracies),
        "dev_history": history,
        "stopped_early_at_epoch": stopped,
        "train_wall_time_s": train_s,
        "started_at": "2026-12-05T00:00:00+00:00",
        "finished_at": "2026-12-05T00:10:00+00:00",
    }
    (directory / "summary.json").write_text(json.dumps(summary))
    config = {"strategy": {"name": strategy}, "diagnostics": {"examples": 100}}
    (directory / "config.yaml").write_text(yaml.safe_dump(config))


def test_early_stopping_replay_follows_the_rule_by_hand():
    replay = load_script("early_stopping_fidelity").replay
    curve = [0.40, 0.45, 0.44, 0.44, 0.46, 0.43, 0.42, 0.41]
    # patience 1: epoch 3 does not beat 0.45 → stop at 3; patience 2: 3, 4 without → stop at 4;
    # patience 3: epoch 5 improves (0.46), then 6, 7, 8 → stop at 8 (the last epoch)
    assert [replay(curve, p) for p in (1, 2, 3)] == [3, 4, 8]
    # min_delta 0.02: 0.46 does not beat 0.45 + 0.02, so patience 3 stops at epoch 5
    assert replay(curve, 3, min_delta=0.02) == 5
    # an equal accuracy is no improvement
    assert replay([0.5, 0.5, 0.5], 2) == 3


def test_fidelity_uses_only_full_curves_and_measures_the_loss(tmp_path):
    fidelity = load_script("early_stopping_fidelity")
    _run(tmp_path / "a", [0.40, 0.45, 0.44, 0.44, 0.46, 0.43])  # best epoch 5
    _run(tmp_path / "b", [0.40, 0.42], stopped=2, epochs=10)  # stopped early: no full curve
    _run(tmp_path / "c", [0.40], epochs=10, status="interrupted")
    runs = fidelity.full_curves([tmp_path])
    assert [r["run"] for r in runs] == [str(tmp_path / "a")]
    by_p = {r["patience"]: r for r in fidelity.analyse(runs, [1, 2, 3], 0.0)["patience"]}
    # patience 1 stops at epoch 3 keeping epoch 2 (0.45): 1 point lost, 3 of 6 epochs saved
    assert by_p[1]["found"] == 0 and abs(by_p[1]["max_lost_points"] - 1.0) < 1e-9
    assert abs(by_p[1]["mean_saved_share"] - 0.5) < 1e-9
    # patience 2 stops at epoch 4 (0.44, 0.44 after 0.45): also loses the later peak
    assert by_p[2]["found"] == 0
    # patience 3 reaches epoch 5 and runs to the end: found, nothing saved
    assert by_p[3]["found"] == 1 and by_p[3]["max_lost_points"] == 0 and by_p[3]["mean_saved_share"] == 0


def test_proxy_cost_medians_per_strategy_and_overhead(tmp_path):
    cost = load_script("proxy_cost")
    _run(tmp_path / "n1", [0.4] * 5, train_s=500.0)  # 100 s per epoch; 600 s wall → 20 s overhead per epoch
    _run(tmp_path / "n2", [0.4] * 4, train_s=480.0)  # 120 s per epoch; 120 s over 4 epochs = 30 s per epoch
    _run(tmp_path / "n3", [0.4] * 10, train_s=1000.0)  # 100 s per epoch, no overhead (600 s wall < train)
    per_epoch, overheads, diagnostics = cost.measured([tmp_path])
    assert sorted(per_epoch["none"]) == [100.0, 100.0, 120.0]
    assert sorted(overheads) == [0.0, 20.0, 30.0]
    assert diagnostics == []
    assert cost.strategy_key({"strategy": {"name": "gradient_penalty", "mode": "exact"}}) == "gradient_penalty[exact]"
    assert cost.strategy_key({"strategy": {"name": "fgm", "target": "embedding_matrix"}}) == "fgm[embedding_matrix]"


def test_proxy_cost_spent_adds_training_diagnostics_and_evaluation(tmp_path):
    cost = load_script("proxy_cost")
    _run(tmp_path / "r", [0.4] * 5, train_s=500.0)
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    summary["diagnostics_wall_time_s"] = 30.0
    (tmp_path / "r" / "summary.json").write_text(json.dumps(summary))
    # 500 s training + 30 s diagnostics + 5 epochs × 20 s overhead
    assert cost.spent(tmp_path / "r", 20.0) == 630.0


def test_study_findings_table_by_hand(tmp_path):
    """scripts/study_findings.py: the README's findings row of a strategy, from hand-made runs checked by hand."""
    import numpy as np
    import pytest
    from scipy import stats
    from test_report import write_run

    script = load_script("study_findings")
    root = tmp_path / "results"
    base, fgm = {1: 50.0, 2: 52.0, 3: 51.0}, {1: 52.0, 2: 53.0, 3: 50.5}
    fgm_final = {1: 50.5, 2: 51.5, 3: 50.2}  # against the baseline's finals 49, 51, 50 (write_run: best − 1)
    for seed in (1, 2, 3):
        write_run(root, "exp", "tnews", {"name": "none"}, seed, base[seed])
        run = write_run(root, "exp", "tnews", {"name": "fgm"}, seed, fgm[seed])
        summary = json.loads((run / "summary.json").read_text())
        summary["final_dev_accuracy"] = fgm_final[seed] / 100
        (run / "summary.json").write_text(json.dumps(summary))
    payload = script.findings(root / "exp", None)
    none, row = payload["rows"]
    assert none["strategy"] == "none" and none["best_delta"] is None
    assert none["best"]["mean"] == pytest.approx(51.0) and none["best"]["std"] == pytest.approx(1.0)
    # paired differences 2, 1, −0.5: mean 5/6, two of three seeds above, t-interval with 2 degrees of freedom
    diffs = np.array([2.0, 1.0, -0.5])
    half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    delta = row["best_delta"]
    assert delta["mean"] == pytest.approx(5 / 6) and delta["seeds_positive"] == 2 and delta["n"] == 3
    assert delta["ci"] == pytest.approx([5 / 6 - half, 5 / 6 + half])
    assert delta["p_holm"] == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)  # one comparison: Holm = p
    # CLUE's reading, the final epoch: paired differences 1.5, 0.5, 0.2, all three seeds above (two at the best)
    final_diffs = np.array([1.5, 0.5, 0.2])
    final = row["final_delta"]
    assert row["final"]["mean"] == pytest.approx(np.mean([50.5, 51.5, 50.2]))
    assert row["final"]["std"] == pytest.approx(np.std([50.5, 51.5, 50.2], ddof=1))
    assert final["mean"] == pytest.approx(2.2 / 3) and final["seeds_positive"] == 3 and final["n"] == 3
    assert final["p_holm"] == pytest.approx(stats.ttest_1samp(final_diffs, 0.0).pvalue)
    assert none["final"]["mean"] == pytest.approx(50.0) and none["final_delta"] is None
    # write_run: best epoch 2 of 3 (the baseline's final accuracy 1 point under its best)
    assert row["best_epoch"] == {"median": 2, "range": [2, 2]}
    assert none["best_minus_final"] == pytest.approx(1.0)
    assert row["best_minus_final"] == pytest.approx(np.mean([52 - 50.5, 53 - 51.5, 50.5 - 50.2]))
    payload["machine"] = {"command": "x", "date": "d", "cpu": "c", "cpu_cores": 2, "torch_threads": 1,
                          "load_average_at_start": [0, 0, 0], "versions": {}, "git_commit": "abc"}  # fmt: skip
    text = script.render(payload)
    p_best, p_final = (stats.ttest_1samp(d, 0.0).pvalue for d in (diffs, final_diffs))
    half_final = stats.t.ppf(0.975, 2) * final_diffs.std(ddof=1) / np.sqrt(3)
    assert (
        f"| fgm | 3 | 51.83 ± {np.std([52.0, 53.0, 50.5], ddof=1):.2f} "
        f"| +0.83 [{5 / 6 - half:+.2f}, {5 / 6 + half:+.2f}] p={p_best:.3f} | 2/3 "
        f"| 50.73 ± {np.std([50.5, 51.5, 50.2], ddof=1):.2f} "
        f"| +0.73 [{2.2 / 3 - half_final:+.2f}, {2.2 / 3 + half_final:+.2f}] p={p_final:.3f} | 3/3 | 2 (2–2) |"
    ) in text
