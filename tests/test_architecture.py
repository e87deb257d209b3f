"""The layout's rules, read from the source (scripts/architecture_stats.py builds the import graph with `ast`):
clue_adv's modules import each other without a cycle, and at module level, so that the graph is the one a
reader sees at the top of each file (only cli.py imports inside its commands, to keep `--help` fast)."""

from __future__ import annotations

from conftest import load_script

stats = load_script("architecture_stats")


def test_the_graph_is_read_from_every_module():
    modules = stats.read_modules()
    assert {"clue_adv.cli", "clue_adv.sweep", "clue_adv.sweep.plan", "clue_adv.report.tables"} <= set(modules)
    assert {"clue_adv.config", "clue_adv.checks"} <= modules["clue_adv.train"].imports
    # Importing a submodule from outside its package runs the package's __init__ first: an edge to both; from
    # inside, the package is already being imported.
    assert {"clue_adv.regularizers", "clue_adv.regularizers.base"} <= modules["clue_adv.train"].imports
    assert "clue_adv.sweep.config" in modules["clue_adv.sweep.plan"].imports
    assert "clue_adv.sweep" not in modules["clue_adv.sweep.plan"].imports


def test_clue_adv_modules_import_each_other_without_a_cycle():
    assert stats.cycles(stats.read_modules()) == []


def test_only_the_cli_imports_clue_adv_modules_inside_functions():
    lazy = {m.name: m.lazy for m in stats.read_modules().values() if m.lazy and m.name not in stats.LAZY_ALLOWED}
    assert lazy == {}
