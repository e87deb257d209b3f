"""What the `clue-adv` commands print: their tables, drawn from the data the commands computed. Nothing here reads
files or runs anything; cli.py decides what to show and on which console (results on stdout, progress and
messages on stderr)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

if TYPE_CHECKING:  # annotations only: printing a plan needs no sweep code
    from clue_adv.sweep import Cell, CellStatus, SweepPlan


def print_whole(console: Console, table: Table, room: int = 10) -> None:
    """Print `table` with its no_wrap columns whole: a value such as `fgm-epsilon=0.05` is never split over two lines
    (`0.0` / `5` reads as ε = 0). When it does not fit the terminal (or a pipe's 80 columns) the table is drawn
    wider than that, leaving the wrapping columns `room` characters."""
    need = Measurement.get(console, console.options.update_width(100_000), table).minimum + room
    # rich has no public way back to "the terminal's width" once a width is set: restore its own setting (None:
    # follow the terminal and COLUMNS), or every later print of this console is held at today's width
    own = console._width
    console.width = max(console.width, need)
    try:
        console.print(table)
    finally:
        console._width = own


def as_yaml(value: Any) -> str:
    """A value as a config file writes it (`null`, `embedding_output`, `true`), not as Python prints it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, default=str)
    return str(value)


def _number(value: Any, template: str) -> str:
    """`template` filled with `value`, or `?`: an already-completed run's summary may be from another version or
    hand-edited."""
    return template.format(value) if isinstance(value, int | float) else "?"


# --------------------------------------------------------------------------------------------------
# train and pretrain


def print_train_result(console: Console, summary: Mapping[str, Any], directory: Path) -> None:
    """A finished (or already completed) run: its scores, steps and time, and where it is."""
    s = summary
    table = Table(title=f"{s.get('task')} · {s.get('strategy_tag')} · seed {s.get('seed')}")
    # percentages, as in the report's tables (summary.json and runs.csv hold fractions)
    for col in ("best dev acc %", "best epoch", "final dev acc %", "macro-F1 % (best)", "steps", "train time"):
        table.add_column(col, justify="right")

    def pct(key: str) -> str:
        value = s.get(key)
        return _number(100 * value if isinstance(value, int | float) else None, "{:.2f}")

    table.add_row(
        pct("best_dev_accuracy"),
        str(s.get("best_epoch", "?")),
        pct("final_dev_accuracy"),
        pct("best_dev_macro_f1"),
        str(s.get("steps", "?")),
        _number(s.get("train_wall_time_s"), "{:.1f}s"),
    )
    console.print(table)
    diagnostics = s.get("diagnostics_wall_time_s")
    if isinstance(diagnostics, int | float):  # their cost, apart from the training time above
        console.print(f"diagnostics: {diagnostics:.1f}s (summary.json: diagnostics)", highlight=False)
    console.print(f"run directory: {directory}", highlight=False)


def print_pretrain_result(console: Console, summary: Mapping[str, Any], model_dir: Path) -> None:
    """A finished (or already completed) pretrain: its held-out MLM figures, and how to fine-tune from it."""
    s = summary
    table = Table(title=f"pretrain · {s.get('source')} · seed {s.get('seed')}")
    for col in ("steps", "time", "held-out MLM loss", "masked-token acc", "at step 0 (loss / acc)"):
        table.add_column(col, justify="right")

    def shown(block: Any, key: str, scale: float = 1.0) -> str:  # an old or hand-edited summary may lack a field
        value = block.get(key) if isinstance(block, dict) else None
        return f"{scale * value:.{2 if scale != 1 else 3}f}" if isinstance(value, int | float) else "?"

    final, initial = s.get("heldout_final"), s.get("heldout_initial")
    table.add_row(
        str(s.get("steps", "?")),
        _number(s.get("elapsed_s"), "{:.0f}s"),
        shown(final, "loss"),
        shown(final, "masked_accuracy", 100),
        f"{shown(initial, 'loss')} / {shown(initial, 'masked_accuracy', 100)}",
    )
    console.print(table)
    console.print(f"model: {model_dir}", highlight=False)
    console.print(
        f"fine-tune from it: --set model.init=pretrained --set model.name_or_path={model_dir} "
        "(and no model.architecture overrides)",
        highlight=False,
    )


# --------------------------------------------------------------------------------------------------
# strategies


def print_strategy(console: Console, r: Mapping[str, Any]) -> None:
    """One strategy in full (`clue-adv strategies NAME`): its cost per step and every parameter with its default
    (and its value, when --set changed one)."""
    console.print(f"[bold]{r['name']}[/]: {r['summary']}", highlight=False)
    cost = f"{r['forward']} forward, {r['backward']} backward" + (" + double backward" if r["double_backward"] else "")
    k = r["batch_factor"]
    if k > 1:  # passes over a stacked batch: what they cost in passes at batch size B
        cost += f" on {k}×B examples (= {r['forward'] * k} forward, {r['backward'] * k} backward at batch B)"
    note = f" ({r['note']})" if r["note"] else ""
    console.print(f"cost per step: {cost}{note}", highlight=False)
    if r["accumulation"]:
        console.print(f"gradient accumulation (optim.grad_accum_steps > 1): {r['accumulation']}", highlight=False)
    changed = any(p["value"] != p["default"] for p in r["parameters"].values())
    table = Table(show_lines=True)
    for col in ("parameter", *(["value"] if changed else []), "default"):
        table.add_column(col, no_wrap=True)  # a value never wraps: `1e-` / `05`
    table.add_column("description")
    for key, p in r["parameters"].items():
        value = [as_yaml(p["value"])] if changed else []
        table.add_row(key, *value, as_yaml(p["default"]), p["description"] or "")
    print_whole(console, table)


def print_strategy_list(console: Console, rows: Sequence[Mapping[str, Any]]) -> None:
    """Every strategy with its passes per training step (`clue-adv strategies`)."""
    # Names never wrap (`clue-adv strategies | grep NAME` finds the row) and the list fits 80 columns, a pipe's
    # width: only "what it does" wraps, at spaces; each strategy's parameters are in `clue-adv strategies NAME`.
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("fwd / bwd", no_wrap=True)
    table.add_column("what it does", overflow="fold", min_width=24)
    for r in rows:
        k = r["batch_factor"]
        stacked = f" on {k}×B" if k > 1 else ""  # passes over a stacked batch cost k passes at batch B
        double = " +double" if r["double_backward"] else ""
        cost = f"{r['forward']} / {r['backward']}{stacked}{double}" + ("*" if r["note"] else "")
        table.add_row(r["name"], cost, r["summary"])
    console.print("Passes per training step. Parameters: `clue-adv strategies NAME`.", highlight=False)
    console.print(table)
    for r in rows:
        if r["note"]:
            console.print(f"* {r['name']}: {r['note']}", highlight=False)
    console.print(
        "Costs are for the defaults; they depend on settings (e.g. gradient_penalty's mode, PGD's steps): "
        "`clue-adv strategies NAME --set FIELD=VALUE` costs a variant.",
        highlight=False,
    )


# --------------------------------------------------------------------------------------------------
# sweep --status and --dry-run


def print_sweep_status(
    console: Console, plan: SweepPlan, statuses: Sequence[CellStatus], order: Sequence[str], title: str
) -> None:
    """Each cell's state (`sweep --status`), then how many are in each state of `order`."""
    table = Table(title=title)
    for col in ("#", "experiment", "task", "strategy", "seed", "status"):
        table.add_column(col, no_wrap=True)
    table.add_column("detail", overflow="fold")
    style = {"completed": "green", "failed": "red", "interrupted": "yellow", "running": "cyan"}
    for i, st in enumerate(statuses, start=1):
        c = st.cell.config
        shown = f"[{style[st.status]}]{st.status}[/]" if st.status in style else st.status
        tag = st.cell.directory.parent.name
        table.add_row(str(i), c.experiment, c.task, escape(tag), str(c.seed), shown, escape(st.detail))
    print_whole(console, table)
    counts = {s: sum(st.status == s for st in statuses) for s in order}
    console.print(", ".join(f"{n} {s}" for s, n in counts.items()), highlight=False)
    console.print(f"run directories under {plan.output_dir.resolve()}", highlight=False)


def print_dry_run(
    console: Console,
    plan: SweepPlan,
    title: str,
    force: bool,
    todo: Sequence[Cell],
    queued: Mapping[Path, tuple[str, dict[str, Any]]],
    slurm: bool,
) -> None:
    """The planned cells (`sweep --dry-run`): which are done, which would run, which wait in a Slurm queue, and
    with `slurm` which array task would hold each."""
    array = {cell.directory: i for i, cell in enumerate(todo)}
    done = sum(c.done for c in plan.cells)
    table = Table(title=title)
    for col in ("#", "experiment", "task", "strategy", "seed", "state") + (("array task",) if slurm else ()):
        table.add_column(col, no_wrap=True)
    for i, cell in enumerate(plan.cells, start=1):
        state = {"completed": "done (skip)", "absent": "to run"}.get(cell.state, f"rerun ({cell.state})")
        if force:
            state = "rerun (--force)" if cell.done else state
        if cell.directory in queued:
            state = f"in the queue: job {queued[cell.directory][1]['job_id']} (wait)"
        c = cell.config
        row = [str(i), c.experiment, c.task, cell.directory.parent.name, str(c.seed), state]
        if slurm:
            row.append(str(array[cell.directory]) if cell.directory in array else "-")
        table.add_row(*row)
    print_whole(console, table, room=0)
    console.print(f"{len(plan.cells)} planned, {done} completed, {len(todo)} to run", highlight=False)
    console.print(f"run directories under {plan.output_dir.resolve()}", highlight=False)
