"""Config schema: shipped configs validate, overrides apply, bad input names the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from clue_adv.config import apply_override, load_config, parse_config
from clue_adv.errors import ConfigError
from clue_adv.validate import validate_file

REPO = Path(__file__).resolve().parents[1]
# Every file in configs/ is a whole run config, but for configs/pretrain/ (pretrain configs: tests/test_pretrain.py)
SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "pretrain")
TINY = REPO / "overrides" / "tiny.yaml"
TASK_CONFIGS = [p for p in SHIPPED if p.parent.name in ("tnews", "iflytek")]


def test_there_are_shipped_configs():
    assert len(SHIPPED) >= 1


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates(path: Path):
    cfg = load_config(path)
    # Local paths that configs point at must exist in the repo (the bundled sample), hub names are not paths.
    problems = [p for p in validate_file(path) if "../shared" not in p]
    assert problems == [], problems
    assert cfg.task in path.as_posix() or path.parent.name == "configs"


@pytest.mark.parametrize("path", TASK_CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_task_config_runs_offline_with_the_tiny_override(path: Path):
    assert validate_file([path, TINY]) == []
    cfg = load_config([path, TINY])
    assert cfg.model.init == "random" and cfg.data.is_local
    assert cfg.data.local_dir(cfg.task).name == cfg.task  # the sample of the config's own task
    # the override changes the model and data, never what is being compared
    assert cfg.strategy == load_config(path).strategy and cfg.task == load_config(path).task


def test_reproduction_configs_follow_the_study():
    for task in ("tnews", "iflytek"):
        study_fgm = load_config(REPO / f"configs/{task}/study-fgm.yaml")
        assert study_fgm.epochs == 50 and study_fgm.optim.eps == 1e-6 and study_fgm.model.head == "cls"
        assert study_fgm.optim.warmup_ratio == 0 and study_fgm.optim.weight_decay == 0
        assert study_fgm.strategy.epsilon == 0.5 and study_fgm.strategy.target == "embedding_matrix"
        assert study_fgm.strategy.combine == "adversarial_only"
        gp = load_config(REPO / f"configs/{task}/study-gradient_penalty.yaml")
        assert gp.strategy.epsilon == 1.0 and gp.strategy.mode == "exact"
        clue = load_config(REPO / f"configs/{task}/baseline.yaml")
        assert clue.epochs == 3 and clue.optim.warmup_ratio == 0.1 and clue.model.name_or_path == "bert-base-chinese"
        # Every study-* config: the study states Adam(2e-5) (../shared/seed/study.txt); the rest is what the
        # configs' comment cites from the study's bert4keras scripts (max length 128, batch 32, eps 1e-6, no
        # warmup/decay/schedule/clipping, 50 epochs, [CLS] head).
        for path in sorted((REPO / f"configs/{task}").glob("study-*.yaml")):
            cfg = load_config(path)
            assert cfg.optim.lr == 2e-5, path
            assert cfg.max_length == 128 and cfg.batch_size == 32, path
            assert cfg.epochs == 50 and cfg.optim.eps == 1e-6 and cfg.model.head == "cls", path
            assert cfg.optim.schedule == "constant" and cfg.optim.warmup_ratio == 0, path
            assert cfg.optim.weight_decay == 0 and cfg.optim.max_grad_norm is None, path
        # Every clue-protocol config: the comment cites CLUE's BERT-base baseline (max length 128, batch 32,
        # AdamW 2e-5, 3 epochs, 10% linear warmup then linear decay); that baseline is Google's run_classifier,
        # whose optimizer clips the global gradient norm at 1.0 and uses Adam epsilon 1e-6.
        for path in sorted((REPO / f"configs/{task}").glob("*.yaml")):
            if path.name.startswith("study-"):
                continue
            cfg = load_config(path)
            assert cfg.optim.lr == 2e-5 and cfg.optim.eps == 1e-6 and cfg.optim.weight_decay == 0.01, path
            assert cfg.max_length == 128 and cfg.batch_size == 32 and cfg.epochs == 3, path
            assert cfg.optim.schedule == "linear" and cfg.optim.warmup_ratio == 0.1, path
            assert cfg.optim.max_grad_norm == 1.0 and cfg.model.head == "pooler", path


def test_later_config_files_override_earlier_ones(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text("task: tnews\noptim: {lr: 1.0e-5, eps: 1.0e-6}\nstrategy: {name: fgm, epsilon: 0.5, norm: sign}\n")
    b.write_text("optim: {lr: 3.0e-5}\nstrategy: {name: gaussian_noise}\n")
    cfg = load_config([a, b])
    assert cfg.optim.lr == 3e-5 and cfg.optim.eps == 1e-6  # merged, not replaced
    assert cfg.strategy.name == "gaussian_noise"  # another strategy replaces the block (fgm's fields would not fit)


def test_set_overrides_nested_fields(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("task: tnews\noptim: {lr: 1.0e-5}\n")
    cfg = load_config(f, ["optim.lr=3e-5", "seed=2", "strategy.name=fgm", "strategy.epsilon=0.25", "data.path=x"])
    assert cfg.optim.lr == pytest.approx(3e-5)
    assert cfg.seed == 2
    assert cfg.strategy.name == "fgm" and cfg.strategy.epsilon == 0.25
    assert cfg.data.path == "x" and cfg.data.is_local


def test_override_needs_key_value():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        apply_override({}, "optim.lr")


def test_all_problems_reported_at_once():
    with pytest.raises(ConfigError) as info:
        parse_config({"task": "tnews", "optm": {}, "seed": "one", "strategy": {"name": "fgm", "epsilonn": 1}})
    text = str(info.value)
    assert "optm: unknown field (did you mean 'optim'?)" in text
    assert "seed:" in text and "'one'" in text
    assert "strategy.epsilonn: unknown field (did you mean 'epsilon'?)" in text


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown strategy 'fmg'; valid: none, .*fgm"):
        parse_config({"task": "tnews", "strategy": {"name": "fmg"}})


@pytest.mark.parametrize(
    "data,needle",
    [
        ({"task": "tnewz"}, "task:"),
        ({"task": "tnews", "optim": {"lr": -1}}, "optim.lr: Input should be greater than 0"),
        ({"task": "tnews", "strategy": {"name": "fgm", "epsilon": -0.5}}, "strategy.epsilon"),
        ({"task": "tnews", "experiment": "../escape"}, "experiment"),
        ({"task": "tnews", "model": {"architecture": {"num_hidden_layers": 2}}}, "init: random"),
        ({"task": "tnews", "optim": {"betas": [0.9, 1.5]}}, "beta"),
    ],
)
def test_bad_values_are_named(data, needle):
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    assert needle in str(info.value)


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("task: tnews\noptim:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert f"{f}:4:" in str(info.value) or f"{f}:3:" in str(info.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_validate_reports_missing_paths_and_positions(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "task: tnews\ndata: {path: /nonexistent/tnews}\nmax_length: 1000\n"
        f"model: {{name_or_path: {REPO / 'clue_adv/assets/tokenizer'}, init: random}}\n"
    )
    problems = validate_file(f)
    assert any("data.path: directory not found: /nonexistent/tnews" in p for p in problems)
    assert any("max_length: 1000 exceeds the model's 512 positions" in p for p in problems)


def test_every_strategy_has_a_shipped_config_per_task():
    from clue_adv.regularizers import registry

    for task in ("tnews", "iflytek"):
        shipped = {load_config(p).strategy.name for p in TASK_CONFIGS if p.parent.name == task}
        assert shipped == set(registry()), set(registry()) ^ shipped


def test_every_run_config_field_has_a_description():
    """config.md is generated from the descriptions; the strategies' blocks are checked in test_strategies_common."""
    from pydantic import BaseModel

    import clue_adv.config.schema as config_module

    models = [m for m in vars(config_module).values() if isinstance(m, type) and issubclass(m, BaseModel)]
    models = [m for m in models if m.__module__ == config_module.__name__]
    assert {"RunConfig", "DataConfig", "ModelConfig", "OptimConfig", "EvalConfig"} <= {m.__name__ for m in models}
    missing = [f"{m.__name__}.{name}" for m in models for name, f in m.model_fields.items() if not f.description]
    assert not missing, missing
