"""User journeys through the command line (issue 18): merging rules, run identity, what blocks a rerun."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml
from conftest import TINY_RUN
from test_sweep import quiet, write_sweep
from typer.testing import CliRunner

from clue_adv.cli import app
from clue_adv.config import as_variant, load_config
from clue_adv.data import ASSETS
from clue_adv.rundir import read_config, read_summary, start_run
from clue_adv.sweep import load_plan, record_setup_failure, run_sweep

runner = CliRunner()


def test_a_sweeps_overrides_block_merges_into_the_base_like_a_config_file(tmp_path):
    # The user's file: a block under `overrides`, as in a run config. It used to replace the base's whole `data`
    # block, so data.path fell back to the hub while validate and --dry-run said all was well.
    overrides = {**TINY_RUN, "epochs": 1, "data": {"max_train_samples": 20}}
    path = write_sweep(tmp_path, {"seeds": 1, "overrides": overrides})
    cell = load_plan(path).cells[0]
    assert cell.config.data.path == str(ASSETS / "tnews")  # the base's, kept
    assert cell.config.data.max_train_samples == 20
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output


def test_per_task_blocks_merge_too(tmp_path):
    path = write_sweep(tmp_path, {"seeds": 1, "per_task": {"tnews": {"data": {"max_eval_samples": 7}}}})
    cell = load_plan(path).cells[0]
    assert cell.config.data.path == str(ASSETS / "tnews") and cell.config.data.max_eval_samples == 7


def test_a_cell_that_failed_before_training_does_not_block_the_fixed_config(tmp_path):
    path = write_sweep(tmp_path, {"seeds": 1})
    cell = load_plan(path).cells[0]
    # The first attempt failed in setup (e.g. the hub could not be reached): a failed summary, no training.
    assert record_setup_failure(cell, "cannot reach the hub") is not None
    fixed = write_sweep(tmp_path, {"seeds": 1, "overrides": {**TINY_RUN, "data.max_train_samples": 24}})
    plan = load_plan(fixed)  # used to raise: "holds a run with a different config (differs in: data....)"
    assert [c.state for c in plan.cells] == ["absent"]
    result = run_sweep(plan, console=quiet())
    assert [r.status for r in result.results] == ["completed"]
    assert read_config(cell.directory)["data"]["max_train_samples"] == 24
    assert read_summary(cell.directory)["status"] == "completed"


def test_a_setup_failure_of_the_new_config_replaces_the_old_setup_failure(tmp_path):
    path = write_sweep(tmp_path, {"seeds": 1})
    cell = load_plan(path).cells[0]
    assert record_setup_failure(cell, "first") is not None
    changed = load_plan(write_sweep(tmp_path, {"seeds": 1, "overrides": {**TINY_RUN, "epochs": 2}})).cells[0]
    assert record_setup_failure(changed, "second") is not None
    assert read_config(cell.directory)["epochs"] == 2 and read_summary(cell.directory)["error"] == "second"


def test_a_run_that_trained_still_blocks_a_changed_config_and_force_replaces_it(tmp_path):
    path = write_sweep(tmp_path, {"seeds": 1})
    cell = load_plan(path).cells[0]
    other = cell.config.model_copy(update={"epochs": 2})
    start_run(other, cell.directory)
    (cell.directory / "metrics.jsonl").write_text(json.dumps({"type": "train", "step": 1, "loss": 2.0}) + "\n")
    (cell.directory / "summary.json").write_text(json.dumps({"status": "failed", "error": "nan loss"}))
    result = runner.invoke(app, ["sweep", "-c", str(path), "--no-report"])
    assert result.exit_code == 2 and "differs in: epochs" in result.output and "--force" in result.output
    assert read_config(cell.directory)["epochs"] == 2
    result = runner.invoke(app, ["sweep", "-c", str(path), "--force", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "1 to run" in result.output and read_config(cell.directory)["epochs"] == 2  # a dry run changes nothing
    result = runner.invoke(app, ["sweep", "-c", str(path), "--force", "--no-report"])  # used to give the same error
    assert result.exit_code == 0, result.output
    assert "replaces the run" in result.output
    assert read_config(cell.directory)["epochs"] == 1 and read_summary(cell.directory)["status"] == "completed"


def tiny_run_config(tmp_path: Path) -> dict:
    return {
        "experiment": "j",
        "task": "tnews",
        "data": {"path": str(ASSETS / "tnews"), "max_train_samples": 16, "max_eval_samples": 16},
        "model": {
            "name_or_path": str(ASSETS / "tokenizer"),
            "init": "random",
            "architecture": {
                "num_hidden_layers": 1,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_attention_heads": 2,
            },
        },
        "max_length": 32,
        "epochs": 1,
        "output_dir": str(tmp_path / "out"),
    }


def test_train_force_replaces_a_run_with_another_config(tmp_path):
    config = tmp_path / "run.yaml"
    body = tiny_run_config(tmp_path)
    config.write_text(yaml.safe_dump(body))
    assert runner.invoke(app, ["train", "-c", str(config)]).exit_code == 0
    body["epochs"] = 2
    config.write_text(yaml.safe_dump(body))
    refused = runner.invoke(app, ["train", "-c", str(config)])
    assert refused.exit_code == 2 and "differs in: epochs" in refused.output
    result = runner.invoke(app, ["train", "-c", str(config), "--force"])
    assert result.exit_code == 0, result.output
    run = Path(tmp_path / "out" / "j" / "tnews" / "none" / "seed-1")
    assert read_config(run)["epochs"] == 2 and read_summary(run)["status"] == "completed"


def test_a_set_variant_of_train_gets_its_own_folder_and_never_collides(tmp_path):
    # The README's journey: a run, then the same config with --set optim.lr=3e-5. It used to fail with "holds a run
    # with a different config (differs in: optim.lr)".
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tmp_path)))
    assert runner.invoke(app, ["train", "-c", str(config)]).exit_code == 0
    result = runner.invoke(app, ["train", "-c", str(config), "--set", "optim.lr=3e-5", "--set", "seed=2"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    variant = out / "j+optim.lr=3e-5" / "tnews" / "none" / "seed-2"  # seed shows in seed-<k>, not in the name
    assert read_summary(variant)["status"] == "completed"
    assert read_config(variant)["optim"]["lr"] == 3e-5
    assert read_config(out / "j" / "tnews" / "none" / "seed-1")["optim"]["lr"] != 3e-5  # untouched
    # Fields that are not the run's identity (where it writes, trackers) name no variant: the same run, skipped.
    again = runner.invoke(app, ["train", "-c", str(config), "--set", "checkpoint.every_epoch=false"])
    assert again.exit_code == 0 and "already completed" in again.output


def test_an_override_file_names_a_variant_beside_the_full_run(tmp_path):
    # The README's `train -c CONFIG -c overrides/tiny.yaml`: its run used to go into the full-size run's folder,
    # where it was refused ("holds a run with a different config").
    config, small = tmp_path / "run.yaml", tmp_path / "overrides" / "small.yaml"
    config.write_text(yaml.safe_dump(tiny_run_config(tmp_path)))
    small.parent.mkdir()
    small.write_text("max_length: 16\n")
    out = tmp_path / "out"
    assert runner.invoke(app, ["train", "-c", str(config)]).exit_code == 0
    result = runner.invoke(app, ["train", "-c", str(config), "-c", str(small)])
    assert result.exit_code == 0, result.output
    variant = out / "j+small" / "tnews" / "none" / "seed-1"
    assert read_summary(variant)["status"] == "completed" and read_config(variant)["max_length"] == 16
    assert read_config(out / "j" / "tnews" / "none" / "seed-1")["max_length"] == 32  # the full run, untouched
    again = runner.invoke(app, ["train", "-c", str(config), "-c", str(small)])
    assert again.exit_code == 0 and "already completed" in again.output and "j+small" in again.output
    # A file of settings that are not the run's identity names no variant: the same run as without it
    settings = tmp_path / "ckpt.yaml"
    settings.write_text("checkpoint: {every_epoch: true}\nlogging: {trackers: []}\noutput_dir: elsewhere\n")
    again = runner.invoke(app, ["train", "-c", str(config), "-c", str(settings), "-o", str(out)])
    assert again.exit_code == 0 and "already completed" in again.output, again.output
    # With --set: the file's name first, in the order they are applied; a file naming its experiment is that one
    cfg = as_variant(load_config([config, small], ["optim.lr=3e-5"]), ["optim.lr=3e-5"], [config, small])
    assert cfg.experiment == "j+small+optim.lr=3e-5"
    named = tmp_path / "mine.yaml"
    named.write_text("experiment: mine\nmax_length: 16\n")
    assert as_variant(load_config([config, named]), [], [config, named]).experiment == "mine"
    assert as_variant(load_config([config, named, small]), [], [config, named, small]).experiment == "mine+small"
    # A sweep's further -c files, the same way
    sweep = write_sweep(tmp_path, {"seeds": 1})
    assert load_plan(sweep, configs=[small]).cells[0].config.experiment == "sw+small"
    assert load_plan(sweep, configs=[settings]).cells[0].config.experiment == "sw"


def test_set_on_a_tagged_strategy_names_a_variant(tmp_path):
    config = tmp_path / "run.yaml"
    body = tiny_run_config(tmp_path) | {"strategy": {"name": "fgm", "tag": "fgm-study"}}
    config.write_text(yaml.safe_dump(body))
    assignments = ["strategy.epsilon=0.2"]
    cfg = as_variant(load_config([config], assignments), assignments)
    assert cfg.experiment == "j+strategy.epsilon=0.2" and cfg.strategy.directory_tag() == "fgm-study"
    untagged = as_variant(load_config([config], ["strategy.tag=null", *assignments]), ["strategy.tag=null"])
    assert untagged.experiment == "j"  # the directory name shows the parameter itself: fgm-epsilon=0.2


def test_a_sweeps_set_names_a_variant_experiment(tmp_path):
    path = write_sweep(tmp_path, {"seeds": 1, "grid": {"optim.lr": [0.001]}})
    plain = load_plan(path).cells[0]
    varied = load_plan(path, overrides=["epochs=2", "logging.trackers=[]"]).cells[0]
    assert plain.config.experiment == "sw+optim.lr=0.001"
    assert varied.config.experiment == "sw+optim.lr=0.001+epochs=2" and varied.directory != plain.directory


def test_a_projects_paths_are_relative_to_its_files_from_any_directory(tmp_path, monkeypatch):
    # The user's project: data and a model beside the configs, named relative to each file. Its paths used to be
    # relative to wherever the command ran (a sweep's `base` alone to its file), so it ran only from one folder.
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    shutil.copytree(ASSETS / "tnews", project / "data" / "tnews")
    shutil.copytree(ASSETS / "tokenizer", project / "models" / "tiny")
    body = tiny_run_config(tmp_path)
    del body["output_dir"]  # the default, `results`: relative to the current directory
    body["data"]["path"] = "../data/tnews"
    body["model"]["name_or_path"] = "../models/tiny"
    (project / "configs").mkdir()
    (project / "configs" / "run.yaml").write_text(yaml.safe_dump(body))
    (project / "sweeps").mkdir()
    sweep = {"base": "../configs/run.yaml", "experiment": "sw", "seeds": 1, "strategies": [{"name": "none"}]}
    sweep["overrides"] = {"data": {"path": "../data/{task}"}}  # a sweep's paths: relative to the sweep file
    (project / "sweeps" / "s.yaml").write_text(yaml.safe_dump(sweep))
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert runner.invoke(app, ["validate", "../project/configs/run.yaml"]).exit_code == 0
    result = runner.invoke(app, ["train", "-c", "../project/configs/run.yaml"])
    assert result.exit_code == 0, result.output
    run = elsewhere / "results" / "j" / "tnews" / "none" / "seed-1"  # written where the command ran
    assert read_summary(run)["status"] == "completed"
    # recorded as the command saw them: outside the current directory, absolute
    assert read_config(run)["model"]["name_or_path"] == str(project / "models" / "tiny")
    assert read_config(run)["data"]["path"] == str(project / "data" / "tnews")
    again = runner.invoke(app, ["train", "-c", "../project/configs/run.yaml"])
    assert again.exit_code == 0 and "already completed" in again.output
    # From the project's folder the model is `models/tiny`: the same directory, so the same run
    monkeypatch.chdir(project)
    again = runner.invoke(app, ["train", "-c", "configs/run.yaml", "-o", "../elsewhere/results"])
    assert again.exit_code == 0 and "already completed" in again.output, again.output
    monkeypatch.chdir(elsewhere)
    result = runner.invoke(app, ["sweep", "-c", "../project/sweeps/s.yaml", "--no-report"])
    assert result.exit_code == 0, result.output
    assert read_config(elsewhere / "results" / "sw" / "tnews" / "none" / "seed-1")["data"]["path"] == str(
        project / "data" / "tnews"
    )


def test_config_is_repeatable_and_merges_the_same_way_on_sweep_and_validate(tmp_path):
    path = write_sweep(tmp_path, {"seeds": 1})
    good, bad = tmp_path / "three-epochs.yaml", tmp_path / "no-epochs.yaml"
    good.write_text("epochs: 3\noptim: {warmup_ratio: 0.2}\n")
    bad.write_text("epochs: 0\n")
    cell = load_plan(path, configs=[good]).cells[0]
    assert cell.config.epochs == 3 and cell.config.optim.warmup_ratio == 0.2
    assert cell.config.optim.lr == 1e-3  # the base's, kept: a block merges
    # `sweep -c a -c b` used to read only the last file, as the sweep file
    result = runner.invoke(app, ["sweep", "-c", str(path), "-c", str(good), "--dry-run"])
    assert result.exit_code == 0, result.output
    for command in (
        ["sweep", "-c", str(path), "-c", str(bad), "--dry-run"],
        ["validate", "-c", str(path), "-c", str(bad)],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "epochs: Input should be greater than 0" in result.output, result.output
    # validate -c merges run configs as train -c does; positional files are each checked on their own, and a failure
    # among several says how to merge them
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(tiny_run_config(tmp_path)))
    merged = runner.invoke(app, ["validate", "-c", str(run), "-c", str(good)])
    assert merged.exit_code == 0 and f"{run} + {good}" in merged.output, merged.output
    alone = runner.invoke(app, ["validate", str(run), str(bad)])
    assert alone.exit_code == 2 and "give each with -c" in " ".join(alone.output.split())


def test_hub_sources_are_named_plainly_when_the_environment_is_offline(tmp_path, monkeypatch):
    # Before: `validate configs/tnews/*.yaml` said ✓ and `sweep --dry-run` "N to run" with the hub switched off.
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["validate", str(repo / "configs" / "tnews" / "fgm.yaml")])
    text = " ".join(result.output.split())
    assert "warning: HF_HUB_OFFLINE=1" in text and "the hub cannot be reached" in text and "bert-base-chinese" in text
    hub_sweep = tmp_path / "hub.yaml"
    hub_sweep.write_text(f"base: {repo / 'configs' / 'tnews' / 'baseline.yaml'}\nseeds: 1\n")
    result = runner.invoke(app, ["sweep", "-c", str(hub_sweep), "--dry-run", "-o", str(tmp_path / "out")])
    text = " ".join(result.output.split())
    assert result.exit_code == 0 and "the hub cannot be reached" in text and "the hub dataset" in text
    # a local sweep says nothing of the hub; online, nothing is said either
    assert "hub cannot" not in runner.invoke(app, ["sweep", "-c", str(write_sweep(tmp_path, {})), "--dry-run"]).output
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    result = runner.invoke(app, ["sweep", "-c", str(hub_sweep), "--dry-run", "-o", str(tmp_path / "out")])
    assert "hub cannot" not in result.output


def test_values_never_wrap_in_an_80_column_dry_run_and_status(tmp_path):
    # `fgm-epsilon=0.0` / `5` read as ε = 0 when the strategy column folded at 80 columns (a pipe's width)
    block = {"name": "fgm", "epsilon": 0.05, "epsilon_unit": "relative", "target": "embedding_matrix"}
    path = write_sweep(tmp_path, {"seeds": 1, "strategies": [block], "grid": {"optim.lr": [0.001, 0.0003]}})
    tag = load_plan(path).cells[0].directory.parent.name
    assert len(tag) > 40
    for flag in ("--dry-run", "--status"):
        result = runner.invoke(app, ["sweep", "-c", str(path), flag], env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        assert tag in result.output and "sw+optim.lr=0.0003" in result.output, result.output


def test_small_traps_of_the_command_line():
    assert runner.invoke(app, ["--version"]).output.startswith("clue-adv ")
    for command in ("train", "sweep", "strategies", "report", "pretrain"):
        help_text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "120"}).output
        flags = [
            line
            for line in help_text.splitlines()
            if any(f in line for f in ("--force", "--json", "--dry-run", "--plots"))
        ]
        assert flags and not any("<bool>" in line for line in flags), help_text  # a flag takes no value
    fgm = runner.invoke(app, ["strategies", "fgm"], env={"COLUMNS": "200"}).output
    assert "None" not in fgm and "'embedding_output'" not in fgm and "null" in fgm  # YAML, as configs write it
    assert "study-fgm.yaml" in fgm  # which preset is the study's
    wrong = runner.invoke(app, ["strategies", "--json", "true"])
    assert wrong.exit_code == 2 and "--json is a flag and takes no value" in wrong.output


def test_latex_turns_markdown_code_into_texttt():
    from clue_adv.report.render import _latex_escape

    assert _latex_escape("vs `none`, 50% of a_b") == r"vs \texttt{none}, 50\% of a\_b"
