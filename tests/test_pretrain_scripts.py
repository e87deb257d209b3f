"""scripts/bench_pretrain.py and scripts/pretrain_warmstart.py run end to end on tiny settings."""

from __future__ import annotations

import csv
import json

import pytest
import yaml
from conftest import load_script


def test_the_pretrain_benchmark_compares_on_the_same_batches(tmp_path):
    bench = load_script("bench_pretrain")
    args = ["--steps", "2", "--warmup", "1", "--texts", "300", "--batch-size", "16", "--max-length", "48"]
    assert bench.main([*args, "--device", "cpu", "--output-dir", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "pretrain-throughput-cpu.json").read_text())
    results = payload["results"]
    assert set(results) == {"hf", "clue_adv", "clue_adv_grouped"}
    # hf and clue_adv step over the same texts in the same order: the same padded batch shapes
    assert results["hf"]["padded_positions_per_step"] == results["clue_adv"]["padded_positions_per_step"]
    assert results["hf"]["real_tokens_per_step"] == results["clue_adv"]["real_tokens_per_step"]
    for r in results.values():
        assert r["steps_per_s"] > 0 and r["tokens_per_s"] > 0 and r["step_time_ratio_hf_over_this"] > 0
    md = (tmp_path / "pretrain-throughput-cpu.md").read_text()
    assert "Command: `python scripts/bench_pretrain.py" in md and "shared with other jobs" in md


@pytest.mark.slow
def test_the_warm_start_experiment_runs_in_smoke_mode(tmp_path):
    warmstart = load_script("pretrain_warmstart")
    assert warmstart.main(["--smoke", "--budgets", "0.02", "--seeds", "1", "--output", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "warmstart.json").read_text())
    starts = {r["start"] for r in payload["comparison"]}
    assert starts == {"random init", "pretrain 0.02 min"}
    runs = list(csv.DictReader((tmp_path / "finetune.csv").open()))
    assert [(r["start"], r["status"]) for r in runs] == [
        ("random init", "completed"),
        ("pretrain 0.02 min", "completed"),
    ]
    curve = list(csv.DictReader((tmp_path / "mlm-curve.csv").open()))
    assert curve[0]["step"] == "0" and float(curve[-1]["heldout_mlm_loss"]) < float(curve[0]["heldout_mlm_loss"])
    assert (tmp_path / "mlm-curve.png").stat().st_size > 0 and (tmp_path / "warmstart.md").is_file()
    # the warm-started run fine-tuned the pretrain's output
    warm = next((tmp_path / "runs" / "finetune" / "finetune-pretrain-0.02-min").rglob("config.yaml"))
    model = yaml.safe_load(warm.read_text())["model"]
    assert model["init"] == "pretrained" and model["name_or_path"].endswith("mlm-seed-1/model")


def test_the_warm_start_experiment_takes_step_budgets(tmp_path):
    """--steps ends each pretrain after exactly that many optimizer steps, whatever the wall clock says."""
    warmstart = load_script("pretrain_warmstart")
    args = warmstart.parse_args(["--smoke", "--steps", "3,5", "--output", str(tmp_path)])
    models = warmstart.pretrain_runs(args, tmp_path / "runs")
    assert list(models) == ["pretrain 3 steps", "pretrain 5 steps"]
    steps = [json.loads((d.parent / "summary.json").read_text())["steps"] for d in models.values()]
    assert steps == [3, 5]


@pytest.mark.parametrize("flags", [["--steps", "10,x"], ["--steps", "2.5"], ["--budgets", "0"]])
def test_the_warm_start_experiment_rejects_bad_budgets(flags, capsys):
    warmstart = load_script("pretrain_warmstart")
    with pytest.raises(SystemExit) as exc:
        warmstart.parse_args(["--smoke", *flags])
    assert exc.value.code == 2 and "budgets must be" in capsys.readouterr().err
