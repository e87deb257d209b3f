"""`clue-adv report` on a hand-made results directory: the table text, CSVs, formats and plots."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from clue_adv.cli import app
from clue_adv.config import dump_config, parse_config
from clue_adv.data import ASSETS
from clue_adv.report import build_report, render
from clue_adv.rundir import atomic_write_json, atomic_write_text, run_dir, strategy_tag

runner = CliRunner()

# Best-epoch dev accuracy (%) per seed; None = the run failed; a missing seed = no run directory.
HAND = {
    ("tnews", "none"): {1: 50, 2: 52, 3: 54},
    ("tnews", "fgm"): {1: 51, 2: 54, 3: 57},
    ("tnews", "gradient_penalty"): {1: 50, 2: 53, 3: 54},
    ("iflytek", "none"): {1: 58, 2: 61, 3: 60},
    ("iflytek", "fgm"): {1: 60, 2: 62, 3: None},
    ("iflytek", "gradient_penalty"): {1: 61, 2: 63},
}
STEP_TIME = {"none": 0.1, "fgm": 0.2, "gradient_penalty": 0.3}


def write_run(root: Path, experiment: str, task: str, strategy: dict, seed: int, best: float | None, **config) -> Path:
    cfg = parse_config({"experiment": experiment, "task": task, "seed": seed, "strategy": strategy, **config})
    directory = run_dir(cfg, root)
    atomic_write_text(directory / "config.yaml", dump_config(cfg))
    if best is None:
        summary = {"status": "failed", "error": "non-finite loss at step 7"}
    else:
        acc = best / 100
        summary = {
            "status": "completed",
            "best_dev_accuracy": acc,
            "final_dev_accuracy": acc - 0.01,
            "best_epoch": 2,
            "mean_step_time_s": STEP_TIME.get(strategy["name"], 0.1),
            "train_wall_time_s": 100.0,
            "peak_memory_mb": 1000.0,
            "dev_history": [
                {"epoch": 1, "step": 10, "accuracy": acc - 0.05, "macro_f1": 0.1, "loss": 2.0},
                {"epoch": 2, "step": 20, "accuracy": acc, "macro_f1": 0.2, "loss": 1.5},
                {"epoch": 3, "step": 30, "accuracy": acc - 0.01, "macro_f1": 0.2, "loss": 1.4},
            ],
        }
    atomic_write_json(directory / "summary.json", summary)
    return directory


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    # The study's setting (bert-base-chinese, pretrained, full data: the config defaults).
    for (task, name), seeds in HAND.items():
        block = {"name": name, "epsilon": 0.5} if name == "fgm" else {"name": name}
        for seed, best in seeds.items():
            write_run(root, "hand", task, block, seed, best)
    # A tiny-model experiment: not the study's setting, one seed.
    tiny = {"model": {"name_or_path": str(ASSETS / "tokenizer"), "init": "random"}}
    write_run(root, "tiny", "tnews", {"name": "none"}, 1, 40, **tiny)
    write_run(root, "tiny", "tnews", {"name": "fgm", "epsilon": 0.05}, 1, 41, **tiny)
    return root


def tag(name: str) -> str:
    block = {"name": name, "epsilon": 0.5} if name == "fgm" else {"name": name}
    return strategy_tag(parse_config({"task": "tnews", "strategy": block}).strategy)


def test_main_table_text(results):
    report = build_report(results, plots=False)
    hand = next(t for t in report.tables if t.experiment == "hand")
    text = render([hand], "md")
    header = (
        "| strategy | IFLYTEK | IFLYTEK Δ vs none [95% CI] | IFLYTEK study (1 run, BERT-base) "
        "| TNEWS | TNEWS Δ vs none [95% CI] | TNEWS study (1 run, BERT-base) |"
    )
    # Δ: paired over shared seeds; p Holm-adjusted over the 4 comparisons: raw p 0.0742 (TNEWS fgm),
    # 0.4226 (TNEWS gp), 0.2048 (IFLYTEK fgm, 2 pairs), 0.1257 (IFLYTEK gp, 2 pairs) ->
    # 4·0.0742 = 0.297, 3·0.1257 = 0.377, 2·0.2048 = 0.410, max(0.410, 0.4226) = 0.423.
    rows = [
        f"| {tag('none')} | 59.67 ± 1.53 (n=3) | baseline | 60.29 | 52.00 ± 2.00 (n=3) | baseline | 56.58 |",
        f"| {tag('fgm')} | 61.00 ± 1.41 (n=2; 1 failed) | +1.50 [-4.85, +7.85] p=0.410 | 62.46 "
        "| 54.00 ± 3.00 (n=3) | +2.00 [-0.48, +4.48] p=0.297 | 57.66 |",
        f"| {tag('gradient_penalty')} | 62.00 ± 1.41 (n=2; 1 missing) | +2.50 [-3.85, +8.85] p=0.377 | 62.31 "
        "| 52.33 ± 2.08 (n=3) | +0.33 [-1.10, +1.77] p=0.423 | 57.81 |",
    ]
    lines = text.splitlines()
    assert header in lines
    start = lines.index(header) + 2
    assert lines[start : start + 3] == rows
    assert "Holm-adjusted across the table's 4 comparison(s)" in text


def test_study_column_only_where_the_runs_match_its_setting(results):
    report = build_report(results, plots=False)
    tiny = next(t for t in report.tables if t.experiment == "tiny")
    text = render([tiny], "md")
    assert "study" not in text
    fgm = strategy_tag(parse_config({"task": "tnews", "strategy": {"name": "fgm", "epsilon": 0.05}}).strategy)
    assert f"| {fgm} | 41.00 ± – (n=1) | +1.00 (1 pair, no test) |" in text.splitlines()
    md = (results / "report.md").read_text()
    assert "56.09" in md and "60.37" in md and "leaderboard *test*" in md  # both baselines, labelled
    assert "non-finite loss at step 7" in md  # the failed run is listed with its error
    assert "### Dev accuracy at the final epoch (%)" in md and "| TNEWS | fgm" in md  # final table, cost table


def test_csv_files(results):
    build_report(results, plots=False)
    runs = list(csv.DictReader(open(results / "runs.csv", encoding="utf-8")))
    assert len(runs) == sum(len(s) for s in HAND.values()) + 2
    failed = [r for r in runs if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["task"] == "iflytek" and failed[0]["seed"] == "3"
    summary = list(csv.DictReader(open(results / "summary.csv", encoding="utf-8")))
    assert len(summary) == 6 + 2  # experiment × task × strategy
    row = next(r for r in summary if r["experiment"] == "hand" and r["task"] == "tnews" and r["strategy"] == "fgm")
    assert float(row["best_mean_pct"]) == pytest.approx(54.0)
    assert float(row["best_delta_pct"]) == pytest.approx(2.0)
    assert float(row["final_delta_pct"]) == pytest.approx(2.0)
    assert float(row["best_p_holm"]) == pytest.approx(4 * 0.0741799, abs=1e-5)
    assert float(row["step_time_ratio"]) == pytest.approx(2.0)
    assert float(row["study_reference_pct"]) == 57.66


def test_formats(results):
    tables = build_report(results, plots=False).tables
    data = json.loads(render(tables, "json"))
    hand = next(t for t in data if t["experiment"] == "hand")
    assert hand["metric"] == "best_dev_accuracy" and hand["unit"] == "percent"
    fgm = next(r for r in hand["rows"] if r["task"] == "iflytek" and r["strategy_name"] == "fgm")
    assert fgm["n"] == 2 and fgm["failed"] == [3] and fgm["delta"]["n_pairs"] == 2
    assert fgm["delta"]["mean"] == pytest.approx(1.5)
    latex = render(tables, "latex")
    assert r"\begin{tabular}" in latex and r"54.00 $\pm$ 3.00" in latex and r"\bottomrule" in latex
    rows = list(csv.reader(io.StringIO(render(tables, "csv").split("\n\n")[0])))
    assert rows[0][:3] == ["experiment", "strategy", "IFLYTEK"] and len(rows) == 4


def test_plots_are_written_and_not_blank(results):
    from matplotlib.image import imread

    report = build_report(results)
    pngs = [p for p in report.files if p.suffix == ".png"]
    assert {p.name for p in pngs} >= {"hand-accuracy.png", "hand-curves.png", "hand-gain-cost.png"}
    for path in pngs:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(path)
        assert image.shape[0] > 100 and np.std(image[..., :3]) > 0.05  # something is drawn
        assert f"]({path.relative_to(results).as_posix()})" in (results / "report.md").read_text()


def test_cli_report_prints_the_table_and_fails_cleanly(results, tmp_path):
    out = runner.invoke(app, ["report", str(results / "hand"), "--no-plots"])
    assert out.exit_code == 0, out.output
    assert "54.00 ± 3.00 (n=3)" in out.output and "Δ +2.00 [-0.48, +4.48]" in out.output
    as_json = runner.invoke(app, ["report", str(results), "--format", "json", "--no-plots"])
    assert as_json.exit_code == 0 and json.loads(as_json.stdout)[0]["experiment"] == "hand"
    missing = runner.invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "results directory not found" in missing.output
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = runner.invoke(app, ["report", str(empty)])
    assert nothing.exit_code == 2 and "no run directories" in nothing.output
    bad = runner.invoke(app, ["report", str(results), "--format", "xlsx"])
    assert bad.exit_code == 2 and "--format" in bad.output
