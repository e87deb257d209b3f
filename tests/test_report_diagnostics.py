"""`clue-adv report`'s diagnostics tables and plots and its early-stopping line, on hand-made run directories whose
summary.json holds `diagnostics.{best,final}` and `stopped_early_at_epoch` as a training run writes them. Expected
means, differences, intervals and p-values are worked out by hand (closed-form t distributions for 1 and 2 degrees
of freedom, Holm by hand), the plots' data from the summaries written here."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import drawn_lines
from test_report import write_run
from typer.testing import CliRunner

from clue_adv.cli import app
from clue_adv.report import build_report, render
from clue_adv.rundir import atomic_write_json, read_summary

runner = CliRunner()

GRAD = "diag/dev/input_grad_norm_mean"
CURV = "diag/dev/input_curvature_mean"
EPSILONS = (0.01, 0.1)

# Best-epoch dev accuracy (%) per seed.
ACCURACY = {
    ("tnews", "none"): {1: 50, 2: 52, 3: 54},
    ("tnews", "fgm"): {1: 51, 2: 54, 3: 57},
    ("tnews", "gaussian_noise"): {1: 50, 2: 53, 3: 56},
    ("iflytek", "none"): {1: 58, 2: 61},
    ("iflytek", "fgm"): {1: 60, 2: 62},
}
# The best model's diagnostics per seed; tnews/gaussian_noise seed 3 is a run from before diagnostics (none recorded).
DIAG = {
    ("tnews", "none"): {GRAD: [0.5, 0.6, 0.7], CURV: [10, 14, 12]},
    ("tnews", "fgm"): {GRAD: [0.3, 0.35, 0.5], CURV: [11, 13, 18]},
    ("tnews", "gaussian_noise"): {GRAD: [0.45, 0.6], CURV: [6, 10]},
    ("iflytek", "none"): {GRAD: [0.8, 1.0], CURV: [20, 30]},
    ("iflytek", "fgm"): {GRAD: [0.4, 0.7], CURV: [25, 27]},
}
# Accuracy under attack (fractions, as recorded): clean accuracy c of the subset, then per method and radius c minus
# a drop; each seed adds 0.01 · seed so that the seeds differ.
CLEAN = {"none": 0.60, "fgm": 0.62, "gaussian_noise": 0.61}
DROP = {
    "none": {("fgm", 0.01): 0.05, ("fgm", 0.1): 0.20, ("pgd", 0.01): 0.08, ("pgd", 0.1): 0.40},
    "fgm": {("fgm", 0.01): 0.02, ("fgm", 0.1): 0.10, ("pgd", 0.01): 0.03, ("pgd", 0.1): 0.25},
    "gaussian_noise": {("fgm", 0.01): 0.04, ("fgm", 0.1): 0.15, ("pgd", 0.01): 0.06, ("pgd", 0.1): 0.35},
}
# Early stopping (patience 3 in every run): the epoch each run stopped at (None: ran all its epochs) and its best
# dev epoch.
STOPPED = {
    ("tnews", "none"): [4, 6, None],
    ("tnews", "fgm"): [5, 8, 7],
    ("tnews", "gaussian_noise"): [None, None, 9],
    ("iflytek", "none"): [4, 4],
    ("iflytek", "fgm"): [None, 6],
}
BEST_EPOCH = {
    ("tnews", "none"): [1, 3, 20],
    ("tnews", "fgm"): [2, 5, 4],
    ("tnews", "gaussian_noise"): [15, 30, 6],
    ("iflytek", "none"): [1, 1],
    ("iflytek", "fgm"): [12, 3],
}


def attack(name: str, seed: int, method: str, eps: float) -> float:
    return CLEAN[name] + 0.01 * seed - DROP[name][(method, eps)]


def diagnostics_of(task: str, name: str, seed: int, shift: float = 0.0) -> dict:
    """One model's results as run_diagnostics records them (`shift` is added to the gradient norm)."""
    grad, curv = DIAG[(task, name)][GRAD][seed - 1], DIAG[(task, name)][CURV][seed - 1]
    out = {
        "epoch": 2,
        "step": 20,
        "diag/dev/examples": 32.0,
        "diag/dev/loss": 1.0,
        "diag/dev/accuracy": CLEAN[name] + 0.01 * seed,
        GRAD: grad + shift,
        "diag/dev/embedding_norm_mean": 1.0 + 0.1 * seed,
        CURV: curv,
        "diag/dev/input_curvature_se": 5.0,
        "diag/gap/loss": 0.1 * seed,
        "diag/gap/accuracy": 0.02 * seed,
        "diag/wall_time_s": 1.0,
    }
    for method in ("fgm", "pgd"):
        for eps in EPSILONS:
            out[f"diag/dev/{method}_accuracy/eps={eps:g}"] = attack(name, seed, method, eps)
            out[f"diag/dev/{method}_loss/eps={eps:g}"] = 2.0
    return out


def fix_run(directory: Path, **fields) -> None:
    summary = read_summary(directory)
    summary.update(fields)
    atomic_write_json(directory / "summary.json", summary)


@pytest.fixture
def results(tmp_path: Path) -> Path:
    root = tmp_path / "results"
    stopping = {"eval": {"early_stopping": {"patience": 3}}}
    for (task, name), seeds in ACCURACY.items():
        for seed, best in seeds.items():
            directory = write_run(root, "diag", task, {"name": name}, seed, best, **stopping)
            fields: dict = {"best_epoch": BEST_EPOCH[(task, name)][seed - 1]}
            stopped = STOPPED[(task, name)][seed - 1]
            if stopped is not None:
                fields["stopped_early_at_epoch"], fields["stopped_early_at_step"] = stopped, 10 * stopped
            if seed <= len(DIAG[(task, name)][GRAD]):
                best_model = diagnostics_of(task, name, seed)
                fields["diagnostics"] = {"best": best_model, "final": diagnostics_of(task, name, seed, shift=0.1)}
            fix_run(directory, **fields)
    return root


def diagnostics_md(root: Path) -> list[str]:
    text = (root / "report.md").read_text(encoding="utf-8")
    section = text.split("### Diagnostics of the best model\n\n", 1)[1].split("\n### ", 1)[0]
    return section.splitlines()


def rows_of(lines: list[str], label: str) -> list[str]:
    """The rows of one quantity's group: its labelled row and the unlabelled rows under it."""
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {label} |"))
    group = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith("|  |"):
            break
        group.append(line)
    return group


def p_df1(t: float) -> float:
    """Two-sided p of a t statistic with 1 degree of freedom (Cauchy): 1 − (2/π)·atan|t|."""
    return 1 - 2 / math.pi * math.atan(abs(t))


def p_df2(t: float) -> float:
    """Two-sided p with 2 degrees of freedom: 1 − |t|/√(2 + t²)."""
    return 1 - abs(t) / math.sqrt(2 + t * t)


def test_diagnostics_table_means_deltas_and_holm(results):
    build_report(results, plots=False)
    lines = diagnostics_md(results)
    assert lines[0] == (
        "| quantity | strategy | IFLYTEK | IFLYTEK Δ vs none [95% CI] | TNEWS | TNEWS Δ vs none [95% CI] |"
    )
    # Gradient norm, 3 decimals (largest mean 0.9). TNEWS fgm − none per seed: −0.2, −0.25, −0.2: mean −0.2167,
    # sd 0.02887, se 0.01667, t = −13, p = 1 − 13/√171 = 0.005865; 95% CI ± 4.3027·0.01667 = ±0.0717.
    # gaussian_noise (seeds 1, 2; seed 3 recorded none): −0.05, 0: mean −0.025, se 0.025, t = −1, p = 0.5, CI
    # ± 12.706·0.025 = ±0.3177. IFLYTEK fgm: −0.4, −0.3: mean −0.35, se 0.05, t = −7, p = 1 − (2/π)atan 7 = 0.0903.
    # Holm over the three: 3·0.005865 = 0.0176, 2·0.0903 = 0.181, max(0.181, 0.5) = 0.5.
    assert p_df2(-13) == pytest.approx(0.005865, abs=1e-6) and p_df1(-7) == pytest.approx(0.0903, abs=1e-4)
    assert rows_of(lines, "input-gradient norm ‖∇ₓℓ‖ (dev)") == [
        "| input-gradient norm ‖∇ₓℓ‖ (dev) | none | 0.900 ± 0.141 (n=2) | baseline | 0.600 ± 0.100 (n=3) | baseline |",
        "|  | fgm | 0.550 ± 0.212 (n=2) | -0.350 [-0.985, +0.285] p=0.181 "
        "| 0.383 ± 0.104 (n=3) | -0.217 [-0.288, -0.145] p=0.018* |",
        "|  | gaussian_noise | missing |  | 0.525 ± 0.106 (n=2; 1 without diagnostics) "
        "| -0.025 [-0.343, +0.293] p=0.500 |",
    ]
    # Curvature, 1 decimal (largest mean 26). TNEWS fgm: 1, −1, 6: mean 2, sd √13 = 3.606, CI ± 4.3027·2.082 =
    # ±8.957; gaussian_noise −4, −4: no spread, no test. IFLYTEK fgm 5, −3: mean 1, se 4, t = 0.25,
    # p = 1 − (2/π)atan 0.25 = 0.8440, CI ± 12.706·4 = ±50.82. TNEWS fgm t = 2/2.082 = 0.9608, p = 1 − 0.9608/√2.923
    # = 0.4380; Holm over the two tests: 2·0.4380 = 0.876, max(0.876, 0.844) = 0.876.
    assert rows_of(lines, "input curvature tr ∇ₓ²ℓ (dev)") == [
        "| input curvature tr ∇ₓ²ℓ (dev) | none | 25.0 ± 7.1 (n=2) | baseline | 12.0 ± 2.0 (n=3) | baseline |",
        "|  | fgm | 26.0 ± 1.4 (n=2) | +1.0 [-49.8, +51.8] p=0.876 | 14.0 ± 3.6 (n=3) | +2.0 [-7.0, +11.0] p=0.876 |",
        "|  | gaussian_noise | missing |  | 8.0 ± 2.8 (n=2; 1 without diagnostics) "
        "| -4.0 (2 pairs, no spread, no test) |",
    ]
    # Fractions are shown in %: TNEWS none's PGD accuracy at ε = 0.1 is 0.60 + 0.01·seed − 0.40 = 21, 22, 23 %.
    pgd = rows_of(lines, "accuracy under PGD, ε = 0.1 (%)")
    assert pgd[0].endswith("| 22.00 ± 1.00 (n=3) | baseline |")
    # fgm − none at every seed: (0.62 − 0.25) − (0.60 − 0.40) = 0.17: 17 pp with no spread.
    assert pgd[1].endswith("| 39.00 ± 1.00 (n=3) | +17.00 (3 pairs, no spread, no test) |")
    # The accuracy gap (train − dev) in percentage points: 0.02·seed -> 2, 4, 6.
    assert rows_of(lines, "gap: train − dev accuracy (pp)")[0].endswith("| 4.00 ± 2.00 (n=3) | baseline |")
    labels = [line.split(" | ")[0].removeprefix("| ") for line in lines[2:] if line.startswith("| ")]
    labels = [label for label in labels if label]
    assert labels[-4:] == [f"accuracy under {m}, ε = {e:g} (%)" for m in ("FGM", "PGD") for e in EPSILONS]
    text = "\n".join(lines)
    assert "Measured on the best model" in text and "`diagnostics.best` in summary.json" in text


def test_diagnostics_formats_and_the_final_model(results):
    tables = build_report(results, plots=False).tables
    out = runner.invoke(app, ["report", str(results), "--no-plots", "--table", "diagnostics", "-f", "csv"])
    assert out.exit_code == 0, out.output
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    fgm = next(r for r in rows if r["task"] == "tnews" and r["strategy"] == "fgm" and r["quantity"] == GRAD)
    assert float(fgm["mean"]) == pytest.approx(np.mean([0.3, 0.35, 0.5]))
    assert float(fgm["delta_mean"]) == pytest.approx(-0.65 / 3)
    assert float(fgm["p"]) == pytest.approx(p_df2(-13)) and float(fgm["p_holm"]) == pytest.approx(3 * p_df2(-13))
    assert int(fgm["n_pairs"]) == 3 and fgm["model"] == "best"
    noise = next(
        r for r in rows if r["task"] == "tnews" and r["strategy"] == "gaussian_noise" and r["quantity"] == GRAD
    )
    assert noise["n"] == "2" and noise["without_diagnostics"] == "1"
    # The final model (--metric final): its gradient norms are the best model's + 0.1 here.
    final = runner.invoke(
        app, ["report", str(results), "--no-plots", "--table", "diagnostics", "-f", "json", "--metric", "final"]
    )
    assert final.exit_code == 0, final.output
    [data] = json.loads(final.stdout)
    assert data["model"] == "final" and data["baseline"] == "none"
    none = next(r for r in data["rows"] if r["task"] == "tnews" and r["strategy"] == "none" and r["quantity"] == GRAD)
    assert none["mean"] == pytest.approx(0.7) and none["unit"] == "nats per embedding unit"
    latex = runner.invoke(app, ["report", str(results), "--no-plots", "--table", "diagnostics", "-f", "latex"])
    assert r"0.383 $\pm$ 0.104 (n=3)" in latex.stdout and r"\bottomrule" in latex.stdout
    rich = runner.invoke(app, ["report", str(results), "--no-plots", "--table", "diagnostics"], env={"COLUMNS": "200"})
    assert "0.383 ± 0.104 (n=3)" in rich.stdout and "Δ -0.217 [-0.288, -0.145] p=0.018*" in rich.stdout
    # diagnostics.csv has both models; the accuracy table and its formats are unchanged by them.
    written = list(csv.DictReader(open(results / "diagnostics.csv", encoding="utf-8")))
    assert {r["model"] for r in written} == {"best", "final"}
    assert "input-gradient" not in render(tables, "md")
    bad = runner.invoke(app, ["report", str(results), "--no-plots", "--table", "gradients"])
    assert bad.exit_code == 2 and "--table: 'gradients' is not one of accuracy, diagnostics" in bad.output


def test_the_scale_free_gradient_norm_is_the_product_of_the_run_means(results):
    """‖x‖·‖∇ₓℓ‖ per run from its two recorded means (the fixture's ‖x‖ is 1 + 0.1·seed), compared like any other."""
    out = runner.invoke(app, ["report", str(results), "--no-plots", "--table", "diagnostics", "-f", "json"])
    assert out.exit_code == 0, out.output
    [data] = json.loads(out.stdout)
    rows = {(r["task"], r["strategy"]): r for r in data["rows"] if r["quantity"] == "report/dev/scale_free_grad_norm"}
    # TNEWS none: 0.5·1.1, 0.6·1.2, 0.7·1.3 = 0.55, 0.72, 0.91; fgm: 0.3·1.1, 0.35·1.2, 0.5·1.3 = 0.33, 0.42, 0.65
    assert rows[("tnews", "none")]["seeds"] == pytest.approx({"1": 0.55, "2": 0.72, "3": 0.91})
    assert rows[("tnews", "none")]["mean"] == pytest.approx((0.55 + 0.72 + 0.91) / 3)
    fgm = rows[("tnews", "fgm")]
    assert fgm["delta"]["mean"] == pytest.approx(((0.33 - 0.55) + (0.42 - 0.72) + (0.65 - 0.91)) / 3)
    assert fgm["delta"]["n_pairs"] == 3
    # gaussian_noise seed 3 recorded no diagnostics: no product for it either
    assert rows[("tnews", "gaussian_noise")]["n"] == 2


def test_early_stopping_line(results):
    build_report(results, plots=False)
    md = (results / "report.md").read_text(encoding="utf-8")
    # Stopped: 4, 6 | 5, 8, 7 | 9 | 4, 4 | 6: 9 of 13, sorted 4 4 4 5 6 6 7 8 9, median 6. Best epochs sorted
    # 1 1 1 2 3 3 4 5 6 12 15 20 30: median 4.
    line = (
        "Early stopping (patience 3): 9 of 13 runs stopped early, at epochs 4–9 (median 6); "
        "best dev epochs 1–30 (median 4)."
    )
    assert line in md.splitlines()
    assert "| TNEWS | none | 3 | 2 | 4, 6 | 1, 3, 20 |" in md
    assert "| IFLYTEK | fgm | 2 | 1 | 6 | 3, 12 |" in md
    out = runner.invoke(app, ["report", str(results), "--no-plots"], env={"COLUMNS": "200"})
    assert "9 of 13 runs stopped early" in out.stdout


def test_without_diagnostics_or_early_stopping_nothing_breaks(tmp_path):
    root = tmp_path / "r"
    for seed in (1, 2):
        write_run(root, "old", "tnews", {"name": "none"}, seed, 50 + seed)
        write_run(root, "old", "tnews", {"name": "fgm"}, seed, 51 + seed)
    # damaged diagnostics blocks: read as none recorded, or the value dropped
    victims = [write_run(root, "old", "tnews", {"name": "fgm"}, seed, 52) for seed in (3, 4, 5)]
    fix_run(victims[0], diagnostics="broken")
    fix_run(victims[1], diagnostics={"best": [1, 2]})
    fix_run(victims[2], diagnostics={"best": {GRAD: "NaN"}})
    result = build_report(root)
    assert not any(p.name.endswith(("-robustness.png", "-gain-mechanism.png")) for p in result.files)
    md = (root / "report.md").read_text(encoding="utf-8")
    assert "No completed run of this experiment recorded diagnostics" in md
    assert "Early stopping" not in md and "stopped early" not in md
    assert (root / "diagnostics.csv").read_text(encoding="utf-8").count("\n") == 1  # the header alone
    out = runner.invoke(app, ["report", str(root), "--no-plots", "--table", "diagnostics", "-f", "json"])
    assert out.exit_code == 0 and json.loads(out.stdout) == []
    assert "recorded diagnostics of its best model" in out.stderr
    # One run with a gradient norm among runs without: a table with dashes, the others counted as without.
    fix_run(victims[2], diagnostics={"best": {GRAD: 0.5}, "final": {GRAD: 0.5}})
    build_report(root, plots=False)
    group = rows_of(diagnostics_md(root), "input-gradient norm ‖∇ₓℓ‖ (dev)")
    assert group == [
        "| input-gradient norm ‖∇ₓℓ‖ (dev) | none | – (2 without diagnostics) | baseline |",
        "|  | fgm | 0.500 ± – (n=1; 4 without diagnostics) | no shared seeds |",
    ]


def test_diagnostics_plots_draw_the_runs_data(results, saved_figures):
    figures = saved_figures
    report = build_report(results)
    md = (results / "report.md").read_text(encoding="utf-8")
    for name in ("diag-robustness.png", "diag-gain-mechanism.png"):
        assert name in {p.name for p in report.files} and f"(plots/{name})" in md

    # Accuracy under attack: per task and method, one line per strategy through (0, clean) and (ε, accuracy), each
    # the mean over the seeds that recorded it, in %.
    by_title = {ax.get_title(): ax for ax in figures["diag-robustness.png"].axes}
    assert set(by_title) == {f"{t}: {m}" for t in ("TNEWS", "IFLYTEK") for m in ("FGM", "PGD")}
    for (task, name), diag in DIAG.items():
        seeds = range(1, len(diag[GRAD]) + 1)
        for method in ("fgm", "pgd"):
            lines = drawn_lines(by_title[f"{task.upper()}: {method.upper()}"])
            expected = [(0.0, 100 * np.mean([CLEAN[name] + 0.01 * s for s in seeds]))]
            expected += [(eps, 100 * np.mean([attack(name, s, method, eps) for s in seeds])) for eps in EPSILONS]
            [drawn] = [xy for label, xy in lines.items() if label.startswith(f"{name} (n=")]
            np.testing.assert_allclose(drawn, expected)

    # Gain vs change: per strategy and task, (mean paired Δ of the diagnostic, mean paired Δ of best-epoch accuracy)
    # over the seeds where both exist: for tnews/gaussian_noise seeds 1 and 2 only (its table Δ of accuracy is over
    # 3 seeds: 1.0 pp; here 0.5 pp).
    def expected_points(key: str, task: str) -> list[tuple[float, float]]:
        out = []
        for name in ("fgm", "gaussian_noise"):
            if (task, name) not in DIAG:
                continue
            seeds = range(1, len(DIAG[(task, name)][key]) + 1)
            change = np.mean([DIAG[(task, name)][key][s - 1] - DIAG[(task, "none")][key][s - 1] for s in seeds])
            gain = np.mean([ACCURACY[(task, name)][s] - ACCURACY[(task, "none")][s] for s in seeds])
            out.append((float(change), float(gain)))
        return out

    def points_of(ax, task: str) -> list[tuple[float, float]]:
        """A point per strategy, named in the legend "<strategy>, <TASK> (n=<paired seeds>)", in strategy order."""
        drawn = drawn_lines(ax)
        return [xy for name in ("fgm", "gaussian_noise") for label, [xy] in drawn.items()
                if label.startswith(f"{name}, {task.upper()} (n=")]  # fmt: skip

    grad_ax, scale_free_ax, curv_ax = figures["diag-gain-mechanism.png"].axes
    for ax, key in ((grad_ax, GRAD), (curv_ax, CURV)):
        assert set(drawn_lines(ax)) == {
            "fgm, TNEWS (n=3)", "gaussian_noise, TNEWS (n=2)", "fgm, IFLYTEK (n=2)"
        }  # fmt: skip
        for task in ("tnews", "iflytek"):
            np.testing.assert_allclose(points_of(ax, task), expected_points(key, task))
    assert expected_points(GRAD, "tnews")[1] == pytest.approx((-0.025, 0.5))
    # The scale-free panel: Δ of ‖x‖·‖∇ₓℓ‖ with ‖x‖ = 1 + 0.1·seed in every run (diagnostics_of), so the change per
    # seed is (1 + 0.1·seed)·(grad − grad of none), by hand here.
    assert "‖x‖·‖∇ₓℓ‖" in scale_free_ax.get_xlabel()
    for task in ("tnews", "iflytek"):
        expected = []
        for name in ("fgm", "gaussian_noise"):
            if (task, name) not in DIAG:
                continue
            seeds = range(1, len(DIAG[(task, name)][GRAD]) + 1)
            grads, base = DIAG[(task, name)][GRAD], DIAG[(task, "none")][GRAD]
            change = np.mean([(1 + 0.1 * s) * (grads[s - 1] - base[s - 1]) for s in seeds])
            gain = np.mean([ACCURACY[(task, name)][s] - ACCURACY[(task, "none")][s] for s in seeds])
            expected.append((change, gain))
        np.testing.assert_allclose(points_of(scale_free_ax, task), expected)

    # One look per strategy across the plots: a strategy's attack curves have its dev-curve colour and line style.
    def looks(ax) -> dict[str, tuple]:
        return {
            line.get_label().split(" (n=")[0]: (line.get_color(), line.get_linestyle(), line.get_marker())
            for line in ax.lines
            if not line.get_label().startswith("_")
        }

    curves = looks(next(ax for ax in figures["diag-curves.png"].axes if ax.get_title() == "TNEWS"))
    for ax in figures["diag-robustness.png"].axes:
        drawn = looks(ax)
        assert drawn and all(drawn[tag] == curves[tag] for tag in drawn), ax.get_title()

    # The scatter plots name each point in the legend, in its strategy's look (colour and marker of its dev curve;
    # one fill per task), and write no label beside it: at a dozen strategies (both
    # tiers of the proxy study) labels beside points of similar gain overlapped and could not be read.
    scatter = [*figures["diag-gain-mechanism.png"].axes, *figures["diag-gain-cost.png"].axes]
    for ax in scatter:
        assert not ax.texts
        legend = sorted(t.get_text() for t in ax.get_legend().get_texts())
        points = [c.lines[0] for c in ax.containers] or [ln for ln in ax.lines if not ln.get_label().startswith("_")]
        labels = [c.get_label() for c in ax.containers] or [ln.get_label() for ln in points]
        assert legend == sorted(labels) and len(labels) == 3
        fills: dict[str, set] = {"TNEWS": set(), "IFLYTEK": set()}
        for label, point in zip(labels, points, strict=True):
            tag, task = label.split(" (n=")[0].split(", ")
            color, _, marker = curves[tag]
            assert (point.get_color(), point.get_marker()) == (color, marker), label
            fills[task].add(point.get_fillstyle())
        assert {len(f) for f in fills.values()} == {1} and fills["TNEWS"] != fills["IFLYTEK"]


def test_a_dozen_strategies_look_different():
    """Both tiers of a study in one plot: no two of 12 strategies share colour, line style and marker."""
    from clue_adv.report.plots import strategy_styles

    tags = [f"s{i}" for i in range(12)]
    styles = strategy_styles(tags)
    assert len({(s["color"], s["linestyle"], s["marker"]) for s in styles.values()}) == 12
    assert strategy_styles(tags[:3]) == {t: styles[t] for t in tags[:3]}  # the same tag order, the same look


def test_the_dev_peak_section(tmp_path):
    """Best epoch median (range) and best − final per strategy, by hand from the runs' summaries."""
    root = tmp_path / "results"
    # (seed, best %, final %, best epoch)
    runs = {
        "none": [(1, 50.0, 48.0, 2), (2, 51.0, 50.0, 3), (3, 52.0, 49.0, 2)],
        "fgm": [(1, 51.0, 51.0, 3), (2, 53.0, 52.5, 9)],
    }
    for name, rows in runs.items():
        for seed, best, final, epoch in rows:
            directory = write_run(root, "peak", "tnews", {"name": name}, seed, best)
            fix_run(directory, final_dev_accuracy=final / 100, best_epoch=epoch)
    build_report(root, plots=False)
    text = (root / "report.md").read_text(encoding="utf-8")
    section = text.split("### The dev peak\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
    # none: drops 2, 1, 3 → mean 2, sd 1; epochs 2, 3, 2 → median 2. fgm: drops 0, 0.5 → mean 0.25, sd 0.3536;
    # epochs 3, 9 → median 6. write_run's dev_history has 3 evaluations.
    assert section[2:] == [
        "| TNEWS | none | 3 | 3 | 2 (2–3) | 2.00 ± 1.00 |",
        "| TNEWS | fgm | 2 | 3 | 6 (3–9) | 0.25 ± 0.35 |",
    ]
    assert "A later peak with a smaller loss after it" in text
