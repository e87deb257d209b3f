"""Regression guard for the strategy benchmark: pass counts are exact, step-time ratios stay below a loose bound.

The counts are deterministic, so they are checked exactly, against each strategy's declared cost and against
REGULARIZERS.md's table. The ratios are timings on a shared machine, so the bound is twice the issue's target
(or twice the pass-count estimate for strategies without one): only a grossly slow change fails.
"""

from __future__ import annotations

import itertools
import json
import sys

import pytest
import torch
from conftest import load_script

from clue_adv.regularizers import registry
from clue_adv.regularizers.consistency import Consistency, ConsistencyConfig
from clue_adv.regularizers.none import NoneConfig, NoRegularizer

# The shape of conftest's tiny_bert: milliseconds per step.
SMALL = {"num_hidden_layers": 2, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64}


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_strategies")


@pytest.fixture(scope="module")
def measured(bench):
    # One thread, as the benchmark itself runs: with two threads on busy shared cores, one descheduled thread
    # stalls every parallel region and single steps swing tenfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        contenders, results = bench.run(
            rows=bench.strategy_rows(),
            architecture=SMALL,
            device=torch.device("cpu"),
            batch_size=16,
            max_length=64,
            steps=7,
            warmup=1,
            batch_count=4,
        )
    finally:
        torch.set_num_threads(threads)
    return {c.row.label: c for c in contenders}, results


def expected_passes(label: str, config) -> tuple[int, int, int] | None:
    """(forward, backward, double backward) per step from REGULARIZERS.md's cost table, where it fixes them."""
    name = config.name
    if name in ("none", "gaussian_noise"):
        return 1, 1, 0
    if name == "fgm":
        return 2, 2, 0
    if name == "pgd":
        return config.steps + 1, config.steps + 1, 0
    if name == "freelb":
        return config.steps, config.steps, 0
    if name == "vat":
        return 2 + config.iterations, 1 + config.iterations, 0
    if name == "smart":  # clean, r₀ and each ascent pass, adversarial; + the EMA teacher's forward when μ > 0
        return 2 + config.iterations + (config.mu > 0), 1 + config.iterations, 0
    if name == "consistency":  # one pass of the batch stacked twice, or two sharing a dropout mask
        return (2 if config.same_dropout_mask else 1), 1, 0
    if label == "gradient_penalty[finite_difference]":
        return 2, 2, 0
    if label in ("gradient_penalty[exact]", "gradient_penalty[normalized]"):
        return 1, 2, 1  # ∇ₓL with create_graph, then one backward through L + penalty
    return None


def test_every_registered_strategy_is_a_row(bench):
    rows = bench.strategy_rows()
    assert rows[0].label == "none"
    assert {r.strategy_name for r in rows} == set(registry())
    labels = [r.label for r in rows]
    assert len(labels) == len(set(labels))
    if "gradient_penalty" in registry():
        assert {"gradient_penalty[exact]", "gradient_penalty[finite_difference]"} <= set(labels)
        assert "gradient_penalty" not in labels  # one row per mode, none for the bare name


def test_selection_keeps_the_baseline_and_rejects_unknown_names(bench):
    assert [r.label for r in bench.strategy_rows(["fgm"])] == ["none", "fgm"]
    with pytest.raises(SystemExit, match="unknown"):
        bench.strategy_rows(["no_such_strategy"])


def test_pass_counts_are_exact(measured):
    contenders, results = measured
    for label, c in contenders.items():
        passes = set(c.passes)
        assert len(passes) == 1, f"{label}: the pass count changed between steps: {passes}"
        (fwd, bwd, dbl) = passes.pop()
        declared = c.strategy.cost()
        assert (fwd, bwd) == (declared.forward, declared.backward), f"{label}: ran {fwd}/{bwd}, declares {declared}"
        assert (dbl > 0) == declared.double_backward, f"{label}: double backward {dbl} vs declared {declared}"
        expected = expected_passes(label, c.row.config)
        if expected is not None:
            assert (fwd, bwd, dbl) == expected, f"{label}: ran {(fwd, bwd, dbl)}, REGULARIZERS.md says {expected}"
        r = results[label]
        assert (r["forward_passes"], r["backward_passes"]) == (fwd, bwd)
        # A double backward needs eager attention; everything else must keep the fused SDPA kernels.
        assert r["attn_implementation"] == ("eager" if declared.double_backward else "sdpa"), label


def test_no_strategy_is_grossly_slow(bench, measured):
    contenders, results = measured
    assert results["none"]["ratio_to_none"] == pytest.approx(1.0)
    too_slow = {}
    for label, r in results.items():
        reference = r["target"] if r["target"] is not None else max(r["cost_estimate"], 1.25)
        if not r["ratio_to_none"] < 2 * reference:
            too_slow[label] = (round(r["ratio_to_none"], 2), 2 * reference)
    assert not too_slow, f"step-time ratio to none above twice the target (ratio, bound): {too_slow}"


def test_targets_cover_the_issue(bench):
    # Issue 6's table: a silently dropped target would make the guard above toothless for that strategy.
    assert bench.TARGETS["fgm"] == 2.0
    assert bench.TARGETS["gradient_penalty[exact]"] == 2.6
    assert bench.TARGETS["gradient_penalty[finite_difference]"] == 2.1
    assert bench.TARGETS["vat"] == 2.1
    assert bench.TARGETS["pgd"] == bench.TARGETS["freelb"] == 4.0


def test_outputs_have_the_promised_fields(bench, tmp_path, monkeypatch):
    monkeypatch.setitem(bench.common.SHAPES, "tiny", SMALL)
    threads = torch.get_num_threads()
    try:
        bench.main(["--steps", "2", "--warmup", "1", "--strategies", "fgm", "--output-dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)  # main() sets the benchmark's thread count for the whole process
    payload = json.loads((tmp_path / "strategies-cpu.json").read_text())
    for label in ("none", "fgm"):
        row = payload["strategies"][label]
        for key in ("ratio_to_none", "step_ms_median", "forward_passes", "backward_passes", "peak_memory_mb"):
            assert key in row, (label, key)
        peak = row["peak_memory_mb"]
        assert peak is not None, f"{label}: the memory probe process failed (its stderr is printed above)"
        assert peak > 100  # RSS of a whole Python + torch process
    md = (tmp_path / "strategies-cpu.md").read_text()
    assert "scripts/bench_strategies.py" in md and payload["machine"]["versions"]["torch"] in md


@pytest.mark.slow
def test_throughput_contenders_train_on_the_same_examples(tmp_path, monkeypatch):
    """One tiny round of the throughput benchmark: every contender runs, and the padding accounting is right."""
    throughput = load_script("bench_throughput")
    monkeypatch.setenv("CLUE_ADV_CACHE", str(tmp_path / "cache"))
    bench = throughput.run_task(
        "tnews",
        architecture=SMALL,
        device=torch.device("cpu"),
        train_examples=64,
        eval_examples=64,
        rounds=1,
        seed=1,
        workdir=tmp_path,
        contenders=("clue_adv", "trainer", "trainer_grouped", "pad128"),
    )
    summary = throughput.task_summary(bench)
    assert set(summary["train"]) == {"clue_adv", "trainer", "trainer_grouped", "pad128"}
    assert set(summary["eval"]) == {"clue_adv", "trainer", "pad128"}
    assert all(r["samples_per_s_median"] > 0 for r in summary["train"].values())
    tokens = bench.padded_tokens
    # Padding to 128 holds every example's tokens plus padding; dynamic padding can only hold fewer positions.
    assert tokens["pad128"] == 64 * 128
    assert tokens["real_tokens"] <= tokens["length_grouped_minimum"] <= tokens["clue_adv"] < tokens["pad128"]
    # On CPU clue_adv pads each batch to its longest example only (no multiple of 8), and its length-grouped
    # sampler sorts windows of 50 batches: on 64 examples that is the whole epoch, so the minimum exactly.
    assert tokens["clue_adv"] <= 1.05 * tokens["length_grouped_minimum"]
    assert tokens["clue_adv"] < tokens["clue_adv_random"]
    assert summary["targets"]["clue_adv_over_pad128"]["target"] == 3.0
    # Only pairs whose both sides ran (clue_adv_random did not); the token ratio is the sampler's, not a timing.
    assert set(summary["like_with_like"]) == {"clue_adv_over_trainer_grouped"}
    pair = summary["like_with_like"]["clue_adv_over_trainer_grouped"]
    assert pair["padded_token_ratio"] == tokens["trainer_grouped"] / tokens["clue_adv"]
    setup = {"shape": "small", "architecture": SMALL, "precision": "fp32", "batch_size": 32, "max_length": 128}
    setup |= {"eval_batch_size": 128, "rounds": 1, "wall_time_s": 1.0}
    info = throughput.common.machine_info(torch.device("cpu"), "python scripts/bench_throughput.py")
    md = throughput.markdown({"machine": info, "setup": setup, "tasks": {"tnews": summary}, "notes": []})
    for name in summary["train"]:
        assert f"| {name} | " in md
    assert "clue_adv_over_trainer_grouped (like with like" in md and "clue_adv_over_trainer: " in md


def test_length_grouped_minimum_is_the_least_padding():
    throughput = load_script("bench_throughput")
    lengths = [5, 1, 4, 2, 3, 3, 9]
    # Cut from the shortest: (1, 2) (3, 3) (4, 5) (9) -> 2·2 + 2·3 + 2·5 + 9 = 29; the lone batch takes the 9.
    assert throughput.length_grouped_minimum(lengths, 2) == 29
    assert throughput.length_grouped_minimum(lengths, 2, multiple=8) == 2 * 8 + 2 * 8 + 2 * 8 + 16
    for batch_size, multiple in ((2, None), (3, None), (2, 4), (3, 4)):
        # Brute force: every order of the seven lengths, cut into consecutive batches as a DataLoader does.
        best = min(
            sum(
                len(chunk) * (max(chunk) if multiple is None else -(-max(chunk) // multiple) * multiple)
                for chunk in (order[i : i + batch_size] for i in range(0, len(order), batch_size))
            )
            for order in itertools.permutations(lengths)
        )
        assert throughput.length_grouped_minimum(lengths, batch_size, multiple) == best, (batch_size, multiple)


def test_cost_estimate_counts_passes_at_batch_size(bench):
    """Consistency's one pass on the stacked 2B batch is worth two passes at B (the benchmark measures ~1.9×)."""
    assert bench.cost_estimate(NoRegularizer(NoneConfig())) == pytest.approx(1.0)
    assert bench.cost_estimate(Consistency(ConsistencyConfig())) == pytest.approx(2.0)
    assert bench.cost_estimate(Consistency(ConsistencyConfig(same_dropout_mask=True))) == pytest.approx(4 / 3)


def test_throughput_says_which_extra_the_trainer_contenders_need(monkeypatch, capsys):
    """accelerate is an extra (`bench`), needed only by transformers.Trainer: without it the benchmark says what to
    install before it starts, instead of failing inside Trainer after minutes of the other contenders."""
    throughput = load_script("bench_throughput")
    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if not installed: find_spec returns None
    with pytest.raises(SystemExit) as stopped:
        throughput.parse_args(["--contenders", "clue_adv,trainer_grouped"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "trainer_grouped" in err and "pip install -e '.[bench]'" in err
    assert throughput.parse_args(["--contenders", "clue_adv,pad128", "--device", "cpu"]).contenders == "clue_adv,pad128"


def test_throughput_run_as_a_script_sees_one_gpu(tmp_path):
    """transformers.Trainer wraps the model in DataParallel over every visible GPU (and multiplies its batch by their
    number); the benchmark compares loops on one GPU, so as a script it leaves only the first one visible, before
    anything can initialise CUDA."""
    import os
    import subprocess

    throughput = load_script("bench_throughput")
    assert throughput.first_gpu_only("2,3") == "2"
    assert throughput.first_gpu_only("GPU-a1, GPU-b2") == "GPU-a1"
    assert throughput.first_gpu_only(None) == "0"
    assert throughput.first_gpu_only("") == ""  # none visible stays none
    script = str(throughput.common.REPO / "scripts" / "bench_throughput.py")
    probe = (
        "import os, runpy, sys\n"
        f"sys.argv = [{script!r}, '--help']\n"
        "try:\n"
        f"    runpy.run_path({script!r}, run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('visible:', os.environ['CUDA_VISIBLE_DEVICES'])\n"
    )
    env = os.environ | {"CUDA_VISIBLE_DEVICES": "2,3"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("visible: 2")


def test_throughput_trainer_refuses_to_spread_over_several_gpus(tmp_path, monkeypatch):
    """Imported rather than run (CUDA may be up before the pin can apply), a Trainer that sees several GPUs stops the
    benchmark with the fix, instead of timing DataParallel with a doubled batch."""
    from types import SimpleNamespace

    from transformers import TrainingArguments

    throughput = load_script("bench_throughput")
    bench = SimpleNamespace(
        cfg=throughput.common.run_config(architecture=SMALL), device=torch.device("cpu"), workdir=tmp_path
    )
    assert throughput._training_args(bench).n_gpu <= 1
    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    with pytest.raises(SystemExit, match="CUDA_VISIBLE_DEVICES to one device"):
        throughput._training_args(bench)
