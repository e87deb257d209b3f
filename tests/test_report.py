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
from clue_adv.config import dump_config, merge, parse_config
from clue_adv.data import ASSETS
from clue_adv.report import build_report, render
from clue_adv.rundir import atomic_write_json, atomic_write_text, run_dir

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
# The study's FGM variant (its Keras code); the config's default FGM is the usual PyTorch one.
STUDY_FGM = {"name": "fgm", "epsilon": 0.5, "target": "embedding_matrix", "combine": "adversarial_only"}


# The study's protocol (configs/*/study-*.yaml); runs here use it unless a test overrides it.
STUDY_PROTOCOL = {
    "model": {"head": "cls"},
    "epochs": 50,
    "optim": {"lr": 2e-5, "weight_decay": 0.0, "eps": 1e-6, "schedule": "constant", "warmup_ratio": 0.0},
}


def write_run(root: Path, experiment: str, task: str, strategy: dict, seed: int, best: float | None, **config) -> Path:
    fields = {"experiment": experiment, "task": task, "seed": seed, "strategy": strategy, **config}
    cfg = parse_config(merge(STUDY_PROTOCOL, fields))
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
        block = STUDY_FGM if name == "fgm" else {"name": name}
        for seed, best in seeds.items():
            write_run(root, "hand", task, block, seed, best)
    # A tiny-model experiment: not the study's setting, one seed.
    tiny = {"model": {"name_or_path": str(ASSETS / "tokenizer"), "init": "random"}}
    write_run(root, "tiny", "tnews", {"name": "none"}, 1, 40, **tiny)
    write_run(root, "tiny", "tnews", {"name": "fgm", "epsilon": 0.05}, 1, 41, **tiny)
    return root


def tag(name: str) -> str:
    block = STUDY_FGM if name == "fgm" else {"name": name}
    return parse_config({"task": "tnews", "strategy": block}).strategy.directory_tag()


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
    assert "Holm-adjusted across the table's 4 comparisons" in text


@pytest.mark.parametrize("seeds", [2, 5])
def test_the_note_says_what_few_seeds_can_show(tmp_path, seeds):
    """The smoke sweep's 2 seeds give intervals like [-74, +64]: the note must say that they show whether strategies
    train, not which helps. At 2 seeds the 95% t quantile (1 degree of freedom: the Cauchy distribution) is
    tan(0.475π) = 12.71; at 5 seeds the note is not needed."""
    import math

    for seed in range(1, seeds + 1):
        write_run(tmp_path, "few", "tnews", {"name": "none"}, seed, 30 + seed)
        write_run(tmp_path, "few", "tnews", {"name": "fgm"}, seed, 29 + 2 * seed)
    text = render(build_report(tmp_path, plots=False).tables, "md")
    note = "With only 2 seeds behind a comparison the table shows whether each strategy trains"
    if seeds == 2:
        assert note in text and f"±{math.tan(0.475 * math.pi):.1f} standard errors" in text
    else:
        assert "With only" not in text


def test_study_column_only_where_the_runs_match_its_setting(results):
    report = build_report(results, plots=False)
    tiny = next(t for t in report.tables if t.experiment == "tiny")
    text = render([tiny], "md")
    assert "study" not in text
    fgm = parse_config({"task": "tnews", "strategy": {"name": "fgm", "epsilon": 0.05}}).strategy.directory_tag()
    assert f"| {fgm} | 41.00 ± – (n=1) | +1.00 (1 pair, no test) |" in text.splitlines()
    md = (results / "report.md").read_text()
    assert "56.09" in md and "60.37" in md and "leaderboard *test*" in md  # both baselines, labelled
    assert "non-finite loss at step 7" in md  # the failed run is listed with its error
    assert "### Dev accuracy at the final epoch (%)" in md and "| TNEWS | fgm" in md  # final table, cost table


def _references(root: Path, experiment: str) -> dict[str, float | None]:
    table = next(t for t in build_report(root, plots=False).tables if t.experiment == experiment)
    return {tag: table.cell("tnews", tag).reference for tag in table.tags}


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (STUDY_FGM, 57.66),
        ({**STUDY_FGM, "epsilon_unit": "relative"}, None),
        ({**STUDY_FGM, "norm": "sign"}, None),
        ({"name": "fgm"}, None),  # the default FGM: per-example output, summed losses
        ({"name": "gradient_penalty"}, 57.81),
        ({"name": "gradient_penalty", "mode": "normalized"}, None),
        ({"name": "gradient_penalty", "target": "embedding_matrix"}, None),
        ({"name": "gradient_penalty", "epsilon": 0.5}, None),
    ],
)
def test_study_row_needs_the_studys_exact_variant(tmp_path, block, expected):
    write_run(tmp_path, "x", "tnews", {"name": "none"}, 1, 50)
    write_run(tmp_path, "x", "tnews", block, 1, 51)
    refs = _references(tmp_path, "x")
    assert refs.pop("none") == 56.58
    assert list(refs.values()) == [expected]


@pytest.mark.parametrize(
    "data",
    [
        {"path": str(ASSETS / "{task}")},  # the bundled sample, absolute
        {"path": "clue_adv/assets/{task}"},  # ... and as the docs write it
        {"max_train_samples": 1000},
        {"max_eval_samples": 100},
    ],
)
def test_no_study_column_without_the_full_data(tmp_path, data):
    write_run(tmp_path, "x", "tnews", {"name": "none"}, 1, 50, data=data)
    write_run(tmp_path, "x", "tnews", STUDY_FGM, 1, 51, data=data)
    assert set(_references(tmp_path, "x").values()) == {None}


@pytest.mark.parametrize(
    "protocol",
    [
        {"model": {"head": "pooler"}},
        {"epochs": 3},
        {"optim": {"schedule": "linear", "warmup_ratio": 0.1}},
        {"optim": {"weight_decay": 0.01}},
        {"max_length": 64},
    ],
)
def test_no_study_column_under_another_training_protocol(tmp_path, protocol):
    """The study's figures are best-of-50-epochs under its own settings: a CLUE-protocol run gets none."""
    write_run(tmp_path, "x", "tnews", {"name": "none"}, 1, 50, **protocol)
    write_run(tmp_path, "x", "tnews", STUDY_FGM, 1, 51, **protocol)
    assert set(_references(tmp_path, "x").values()) == {None}


def test_study_column_only_in_the_best_epoch_table(results):
    hand = next(t for t in build_report(results, plots=False).tables if t.experiment == "hand")
    assert "56.58" in render([hand], "md", metric="best") and "study" in render([hand], "md", metric="best")
    final = render([hand], "md", metric="final")
    assert "study" not in final and "56.58" not in final
    assert all("study_reference" not in row for row in json.loads(render([hand], "json", metric="final"))[0]["rows"])


def test_study_column_with_full_data_from_a_local_directory(tmp_path):
    write_run(tmp_path, "x", "tnews", {"name": "none"}, 1, 50, data={"path": "/data/clue/{task}"})
    assert _references(tmp_path, "x") == {"none": 56.58}


def test_identical_differences_show_no_test(tmp_path):
    # fgm beats the baseline by exactly 1 point on both seeds: scipy's p = 0 would print "p<0.001*".
    for seed, best in ((1, 50), (2, 52)):
        write_run(tmp_path, "x", "tnews", {"name": "none"}, seed, best)
        write_run(tmp_path, "x", "tnews", STUDY_FGM, seed, best + 1)
        write_run(tmp_path, "x", "tnews", {"name": "gradient_penalty"}, seed, best + 2 * seed)
    tables = build_report(tmp_path, plots=False).tables
    text = render(tables, "md")
    assert f"| {tag('fgm')} | 52.00 ± 1.41 (n=2) | +1.00 (2 pairs, no spread, no test) |" in text
    assert "p<0.001" not in text
    assert "across the table's 1 comparison;" in text  # only gradient_penalty is tested
    fgm = next(r for r in json.loads(render(tables, "json"))[0]["rows"] if r["strategy_name"] == "fgm")
    assert fgm["delta"]["p"] is None and fgm["delta"]["p_holm"] is None


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
    # CSV holds numbers, one row per strategy and task (it held the terminal's `54.00 ± 3.00 (n=2)` text)
    rows = list(csv.DictReader(io.StringIO(render(tables, "csv"))))
    fgm_row = next(
        r for r in rows if r["experiment"] == "hand" and r["task"] == "iflytek" and r["strategy"] == fgm["strategy"]
    )
    assert float(fgm_row["mean"]) == pytest.approx(fgm["mean"]) and float(fgm_row["delta_mean"]) == pytest.approx(1.5)
    assert int(fgm_row["n"]) == 2 and int(fgm_row["n_pairs"]) == 2


def _data_points(ax) -> list[tuple[float, float]]:
    """Every point the axes draws in data coordinates: line vertices (not axhline/axvline, whose transform
    is blended with axes units) and scatter/errorbar-marker offsets. Titles, labels and grids are not data."""
    points = []
    for line in ax.lines:
        if line.get_transform() is ax.transData:
            points += [(float(x), float(y)) for x, y in line.get_xydata() if np.isfinite(x) and np.isfinite(y)]
    for collection in ax.collections:
        if collection.get_offset_transform() is ax.transData:
            points += [(float(x), float(y)) for x, y in collection.get_offsets() if np.isfinite(x) and np.isfinite(y)]
    return points


def test_plots_are_written_and_draw_the_data(results, saved_figures):
    from matplotlib.image import imread

    figures = saved_figures
    report = build_report(results)
    pngs = [p for p in report.files if p.suffix == ".png"]
    assert {p.name for p in pngs} >= {"hand-accuracy.png", "hand-curves.png", "hand-gain-cost.png"}
    for path in pngs:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(path)
        assert image.shape[0] > 100 and np.std(image[..., :3]) > 0.05
        assert f"]({path.relative_to(results).as_posix()})" in (results / "report.md").read_text()
        assert all(_data_points(ax) for ax in figures[path.name].axes), f"{path.name}: an axes without data"

    # Per seed: every completed run's accuracy is a point on its task's panel (x is jittered, y is not).
    by_title = {ax.get_title(): ax for ax in figures["hand-accuracy.png"].axes}
    for task, name in (("tnews", "TNEWS"), ("iflytek", "IFLYTEK")):
        drawn = sorted(y for ax in [by_title[name]] for c in ax.collections for _, y in c.get_offsets())
        expected = sorted(v for (t, _), seeds in HAND.items() if t == task for v in seeds.values() if v is not None)
        assert drawn == pytest.approx(expected)
    # Curves: one line of 3 evaluations per strategy and task.
    for ax in figures["hand-curves.png"].axes:
        assert sorted(len(line.get_xdata()) for line in ax.lines) == [3, 3, 3]
    # Gain vs cost: one marker per strategy × task compared with the baseline, at its Δ (pp).
    markers = [c.lines[0] for c in figures["hand-gain-cost.png"].axes[0].containers]  # errorbar's data line
    ys = sorted(y for line in markers for y in line.get_ydata())
    assert ys == pytest.approx(sorted([1.5, 2.5, 2.0, 1 / 3]))


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


def test_cells_a_sweep_planned_but_never_started_are_reported(results):
    """A sweep manifest (sweep.json) lists an extra seed and an extra strategy that have no run directory."""
    tiny = {"model": {"name_or_path": str(ASSETS / "tokenizer"), "init": "random"}}

    def entry(block: dict, seed: int) -> dict:
        cfg = parse_config({"experiment": "tiny", "task": "tnews", "seed": seed, "strategy": block, **tiny})
        directory = run_dir(cfg, results).relative_to(results / "tiny").as_posix()
        identity = {k: v for k, v in cfg.resolved().items() if k != "output_dir"}
        tag = cfg.strategy.directory_tag()
        names = {"task": "tnews", "strategy": block["name"], "strategy_tag": tag, "seed": seed}
        return {"run_dir": directory, **names, "identity": identity}

    planned = [entry({"name": "none"}, 1), entry({"name": "none"}, 2), entry({"name": "gaussian_noise"}, 1)]
    atomic_write_json(results / "tiny" / "sweep.json", {"experiment": "tiny", "sweep": "x.yaml", "cells": planned})
    report = build_report(results, plots=False)
    tiny_table = next(t for t in report.tables if t.experiment == "tiny")
    assert tiny_table.cell("tnews", "none").not_started == [2]
    assert tiny_table.cell("tnews", "gaussian_noise").not_started == [1]
    assert tiny_table.cell("tnews", "fgm-epsilon=0.05").not_started == []
    assert all(not c.not_started for t in report.tables if t.experiment == "hand" for c in t.cells.values())
    text = (results / "report.md").read_text(encoding="utf-8")
    assert "40.00 ± – (n=1; 1 not started)" in text
    assert "`tnews/gaussian_noise/seed-1`: not started" in text
    runs = list(csv.DictReader(open(results / "runs.csv", encoding="utf-8")))
    assert sorted((r["strategy_tag"], r["seed"]) for r in runs if r["status"] == "not started") == [
        ("gaussian_noise", "1"),
        ("none", "2"),
    ]
    summary = list(csv.DictReader(open(results / "summary.csv", encoding="utf-8")))
    row = next(r for r in summary if r["experiment"] == "tiny" and r["strategy_tag"] == "gaussian_noise")
    assert row["completed"] == "0" and row["not_started"] == "1"
    rows = json.loads(render(report.tables, "json"))
    row = next(r for t in rows if t["experiment"] == "tiny" for r in t["rows"] if r["strategy"] == "none")
    assert row["not_started"] == [2] and row["n"] == 1
    # A report of one task folder reads the manifest above it, and only the cells under that folder.
    assert {r.status for r in build_report(results / "tiny" / "tnews" / "none", plots=False).runs} == {
        "completed",
        "not started",
    }


def test_rows_follow_the_order_the_sweep_files_plan(results):
    """Rows are the baseline, then strategies in the order the manifest plans them (here not the registry's,
    which puts fgm before gaussian_noise), then strategies no sweep planned."""
    tiny = {"model": {"name_or_path": str(ASSETS / "tokenizer"), "init": "random"}}
    write_run(results, "tiny", "tnews", {"name": "gradient_penalty"}, 1, 39, **tiny)  # run by hand, unplanned

    def entry(block: dict) -> dict:
        cfg = parse_config({"experiment": "tiny", "task": "tnews", "seed": 1, "strategy": block, **tiny})
        directory = run_dir(cfg, results).relative_to(results / "tiny").as_posix()
        identity = {k: v for k, v in cfg.resolved().items() if k != "output_dir"}
        names = {"task": "tnews", "strategy": block["name"], "strategy_tag": cfg.strategy.directory_tag(), "seed": 1}
        return {"run_dir": directory, **names, "identity": identity}

    blocks = [{"name": "gaussian_noise"}, {"name": "fgm", "epsilon": 0.05}, {"name": "none"}]
    atomic_write_json(
        results / "tiny" / "sweep.json", {"experiment": "tiny", "sweep": "x.yaml", "cells": [entry(b) for b in blocks]}
    )
    report = build_report(results, plots=False)
    tiny_table = next(t for t in report.tables if t.experiment == "tiny")
    order = ["none", "gaussian_noise", "fgm-epsilon=0.05", "gradient_penalty"]
    assert tiny_table.tags == order
    text = render([tiny_table], "md")
    first_rows = [next(i for i, line in enumerate(text.splitlines()) if line.startswith(f"| {t} |")) for t in order]
    assert first_rows == sorted(first_rows)


def test_cli_report_metric_chooses_the_printed_table(results):
    best = runner.invoke(app, ["report", str(results / "hand"), "--no-plots"])
    assert "Dev accuracy at the best epoch" in best.output and "54.00 ± 3.00 (n=3)" in best.output
    final = runner.invoke(app, ["report", str(results / "hand"), "--no-plots", "--metric", "final"])
    assert final.exit_code == 0, final.output
    assert "Dev accuracy at the final epoch" in final.output and "53.00 ± 3.00 (n=3)" in final.output
    assert "best epoch" not in final.output
    as_json = runner.invoke(app, ["report", str(results / "hand"), "-f", "json", "--no-plots", "--metric", "final"])
    assert json.loads(as_json.stdout)[0]["metric"] == "final_dev_accuracy"
    md = (results / "hand" / "report.md").read_text(encoding="utf-8")
    assert "at the best epoch" in md and "at the final epoch" in md  # report.md keeps both
    bad = runner.invoke(app, ["report", str(results / "hand"), "--metric", "last"])
    assert bad.exit_code == 2 and "--metric: 'last' is not one of best, final" in bad.output
    assert "Traceback" not in bad.output


def test_report_shows_a_running_run_whose_lock_is_free_and_old_as_interrupted(results):
    import os
    import time

    from clue_adv.report import build_report
    from clue_adv.rundir import LOCK_NAME

    run = write_run(results, "hand", "tnews", {"name": "none"}, 9, 50)
    atomic_write_json(run / "summary.json", {"status": "running"})
    old = time.time() - 3600
    os.utime(run / "summary.json", (old, old))
    statuses = lambda: {r.seed: r.status for r in build_report(results / "hand", plots=False).runs if r.seed == 9}  # noqa: E731
    assert statuses() == {9: "running"}  # no lock file: a version without locks, nothing to tell by
    (run / LOCK_NAME).touch()  # a lock nothing holds: its process died
    assert statuses() == {9: "interrupted"}
    os.utime(run / "summary.json")  # written just now: perhaps alive on another node, still running
    assert statuses() == {9: "running"}
    out = runner.invoke(app, ["report", str(results / "hand"), "--no-plots"])
    assert out.exit_code == 0 and "running" in out.output


def test_latex_escapes_every_special_character_once():
    from clue_adv.report.render import _latex_escape

    assert _latex_escape(r"a_b {x} $5 & #1 100% ^ ~ \ ±") == (
        r"a\_b \{x\} \$5 \& \#1 100\% \textasciicircum{} \textasciitilde{} \textbackslash{} $\pm$"
    )


def test_a_holdout_evaluated_experiment_says_so_in_the_report_and_on_the_console(tmp_path):
    """A selection sweep (data.eval_split: holdout) reports holdout accuracies: the report must not let them read
    as dev results; an experiment evaluated on dev says the dev set."""
    root = tmp_path / "results"
    holdout = {"data": {"holdout_size": 5000, "holdout_seed": 0, "eval_split": "holdout"}}
    for seed in (1, 2):
        write_run(root, "select", "tnews", {"name": "none"}, seed, 50 + seed, **holdout)
        write_run(root, "final", "tnews", {"name": "none"}, seed, 50 + seed)
    build_report(root, plots=False)
    sections = {part.split("`")[0]: part for part in (root / "report.md").read_text().split("## Experiment `")[1:]}
    said = "- evaluated on: a holdout of 5000 training examples (seed 0), not the official dev set"
    assert said in sections["select"]
    assert "- evaluated on: the dev set" in sections["final"] and "holdout" not in sections["final"]
    result = CliRunner().invoke(app, ["report", str(root), "--no-plots"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert result.output.count("Evaluated on a holdout of 5000 training examples") == 1  # the select table only


def test_how_the_runs_were_made_adds_up_their_measured_time(tmp_path):
    """The report's provenance section sums each completed run's training, evaluation and diagnostics time, and
    weights it by the run's torch threads for CPU core-hours; a run without host facts makes that sum unknowable."""
    root = tmp_path / "results"
    host = {"cpu": "Test CPU 9000", "cpu_cores": 8, "platform": "Linux"}
    times = {"train_wall_time_s": 3600.0, "eval_wall_time_s": 360.0, "diagnostics_wall_time_s": 36.0}
    for seed, threads in ((1, 2), (2, 1)):
        directory = write_run(root, "prov", "tnews", {"name": "none"}, seed, 50)
        summary = json.loads((directory / "summary.json").read_text())
        summary |= times | {
            "host": host | {"torch_threads": threads},
            "device": "cpu (8 cores)",
            "git_commit": "abcdef1234567",
            "started_at": f"2026-03-0{seed}T10:00:00+00:00",
            "finished_at": f"2026-03-0{seed}T11:07:00+00:00",
        }
        atomic_write_json(directory / "summary.json", summary)
    build_report(root, plots=False)
    text = (root / "report.md").read_text(encoding="utf-8")
    section = text[text.index("### How these runs were made") :].split("\n\n## ")[0]
    # by hand: 2 runs × (3600 + 360 + 36) s = 7992 s = 2.22 h; × threads: (2 + 1) × 3996 s = 3.33 h
    assert "- compute, 2 completed run(s), summed: 2.22 h (training 2.00 h; evaluation 0.20 h; diagnostics 0.02 h)" in (
        section
    )
    assert "× each run's torch threads: 3.33 h of CPU cores" in section
    assert (
        "- clue_adv commit: abcdef123 (2 runs)" in section and "- machine: Test CPU 9000, 8 cores (2 runs)" in section
    )
    assert "- period: 2026-03-01 10:00 → 2026-03-02 11:07 UTC" in section

    # a third run from before host facts were recorded: no core-hours claimed
    directory = write_run(root, "prov", "tnews", {"name": "none"}, 3, 50)
    summary = json.loads((directory / "summary.json").read_text()) | times | {"started_at": "2026-03-03T00:00:00"}
    atomic_write_json(directory / "summary.json", summary)
    build_report(root, plots=False)
    text = (root / "report.md").read_text(encoding="utf-8")
    assert "summed: 3.33 h" in text and "threads not recorded by all runs" in text and "of CPU cores" not in text
