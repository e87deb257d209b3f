"""Bad input never produces a traceback; a local run never touches the network."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import yaml
from conftest import smoke_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from clue_adv.cli import app
from clue_adv.train import train

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "configs").rglob("*.yaml"))
runner = CliRunner()


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    # The shipped configs name data and tokenizer relative to the repository root.
    monkeypatch.chdir(REPO)


def _paths(node, prefix=()):
    """Every dotted path in a nested mapping, blocks included."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.integers(-(2**70), 2**70),  # beyond int64 and the seeding range
    st.sampled_from(["~no-such-user-x/a", "~", "../..", "/", "x" * 300, "a/b", "."]),  # paths and names
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=6), st.integers(), max_size=2),
)


@st.composite
def mutated_configs(draw):
    path = draw(st.sampled_from(SHIPPED))
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    for _ in range(draw(st.integers(1, 3))):
        keys = list(_paths(data))
        kind = draw(st.sampled_from(["replace", "delete", "add"]))
        target = list(draw(st.sampled_from(keys)))
        node = data
        for k in target[:-1]:
            node = node[k]
        if not isinstance(node, dict):
            continue
        if kind == "replace":
            node[target[-1]] = draw(values)
        elif kind == "delete":
            node.pop(target[-1], None)
        else:
            node[draw(st.text(min_size=1, max_size=10))] = draw(values)
    return data


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=mutated_configs())
def test_mutated_configs_validate_or_fail_with_exit_2(tmp_path_factory, data):
    f = tmp_path_factory.mktemp("mut") / "c.yaml"
    f.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    result = runner.invoke(app, ["validate", str(f)])
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        assert "- " in result.output  # at least one named problem


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_unmutated_shipped_configs_validate(path):
    """The fuzz test's starting points pass, so its mutations reach past the schema to the later checks."""
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output


def test_non_finite_numbers_are_config_errors():
    from clue_adv.errors import ConfigError

    for field in ({"optim": {"lr": float("inf")}}, {"label_smoothing": float("nan")}):
        with pytest.raises(ConfigError, match="finite"):
            from clue_adv.config import parse_config

            parse_config({"task": "tnews", **field})


def test_a_local_run_opens_no_network_connection(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    # conftest makes every test offline; undo it so that the run has to go offline by itself.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)  # read at import: the variable alone is not enough
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted during a local run")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    outcome = train(smoke_config(data={"path": smoke_config().data.path, "max_train_samples": 64,
                                       "max_eval_samples": 32}), tmp_path, show_progress=False)  # fmt: skip
    assert outcome.summary["status"] == "completed"
    assert attempts == []


def test_experiment_name_cannot_escape_the_output_directory():
    from clue_adv.errors import ConfigError

    for name in ("..", "../x", "a/b", ".hidden"):
        with pytest.raises(ConfigError, match="experiment"):
            smoke_config(experiment=name)
    # A blacklist passes these; the name then fails deep in the filesystem (ValueError: embedded null byte).
    for name in ("a\0b", "a\nb", "a:b", "a b", "", "x" * 81):
        with pytest.raises(ConfigError, match="experiment"):
            smoke_config(experiment=name)
    assert smoke_config(experiment="clue-protocol_v2.1").experiment == "clue-protocol_v2.1"


def test_config_file_that_is_not_utf8_exits_2(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_bytes(b"task: tnews\nexperiment: caf\xe9\n")  # Latin-1, as an editor might save it
    result = runner.invoke(app, ["validate", str(f)])
    assert result.exit_code == 2, result.output
    assert f"{f}: not valid UTF-8" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)


def test_output_dir_that_is_a_file_exits_2_naming_it(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(smoke_config().resolved(), allow_unicode=True), encoding="utf-8")
    (tmp_path / "out").write_text("not a folder")
    result = runner.invoke(app, ["train", "--config", str(f), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert f"{tmp_path / 'out'} exists and is not a directory" in " ".join(result.output.split())


def test_double_backward_with_fused_attention_names_the_field():
    """A strategy that differentiates a gradient cannot run on SDPA kernels: the error names the field to change."""
    result = runner.invoke(
        app,
        [
            "validate",
            str(Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"),
            "--set",
            "strategy={name: gradient_penalty, mode: exact}",
            "--set",
            "model.attn_implementation=sdpa",
        ],
    )
    assert result.exit_code == 2, result.output
    assert "model.attn_implementation: 'sdpa' cannot run strategy 'gradient_penalty'" in result.output
    assert "(top level)" not in result.output
