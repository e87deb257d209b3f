"""The `clue-adv` command: wiring only; the work happens in config/train/sweep/report."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from clue_adv.errors import ClueAdvError

app = typer.Typer(
    help="Noise, adversarial training and gradient penalties for BERT on CLUE TNEWS/IFLYTEK.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)

ConfigArg = Annotated[
    list[Path],
    typer.Option("--config", "-c", help="Run config (YAML); repeat to merge, later files override earlier ones."),
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a field: --set optim.lr=3e-5 (repeatable).")
]
OutputOpt = Annotated[
    Path | None, typer.Option("--output-dir", "-o", help="Root of run directories (default: the config's).")
]


def _fail(e: ClueAdvError) -> None:
    err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(e.exit_code)


@app.command()
def train(
    config: ConfigArg,
    set_: SetOpt = None,
    output_dir: OutputOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Rerun even if this run already completed.")] = False,
) -> None:
    """Train one run from a YAML config and evaluate it on dev every epoch."""
    from clue_adv.config import load_config

    try:
        cfg = load_config(config, set_ or [])
        from clue_adv.train import train as run_training

        outcome = run_training(cfg, output_dir, force=force, console=err)
    except ClueAdvError as e:
        _fail(e)
    except KeyboardInterrupt:
        err.print("interrupted: the run is marked 'interrupted'; rerun the same command to start it again")
        raise typer.Exit(130) from None
    s = outcome.summary
    if outcome.skipped:
        err.print(f"already completed: {outcome.directory} (use --force to rerun)", highlight=False)
    table = Table(title=f"{s.get('task')} · {s.get('strategy_tag')} · seed {s.get('seed')}")
    for col in ("best dev acc", "best epoch", "final dev acc", "macro-F1 (best)", "steps", "train time"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{100 * s['best_dev_accuracy']:.2f}",
        str(s["best_epoch"]),
        f"{100 * s['final_dev_accuracy']:.2f}",
        f"{100 * s['best_dev_macro_f1']:.2f}",
        str(s["steps"]),
        f"{s['train_wall_time_s']:.1f}s",
    )
    out.print(table)
    out.print(f"run directory: {outcome.directory}", highlight=False)


@app.command()
def validate(
    configs: Annotated[list[Path], typer.Argument(help="Config files to check.")],
    merge_with: Annotated[
        list[Path] | None, typer.Option("--with", help="Merge this file over each config first (e.g. an override).")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Check configs without training; every problem of every file is reported."""
    from clue_adv.validate import validate_file

    bad = 0
    for path in configs:
        problems = validate_file([path, *(merge_with or [])], set_ or [])
        if problems:
            bad += 1
            err.print(f"[red]✗[/] {path}", highlight=False)
            for p in problems:
                err.print(f"    - {p}", highlight=False, markup=False)
        else:
            out.print(f"[green]✓[/] {path}", highlight=False)
    if bad:
        raise typer.Exit(2)


@app.command()
def strategies(
    name: Annotated[str | None, typer.Argument(help="Show one strategy's parameters in full.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List every strategy with its parameters, defaults and cost per training step."""
    from clue_adv.regularizers import describe_strategies

    rows = describe_strategies()
    if name is not None:
        rows = [r for r in rows if r["name"] == name]
        if not rows:
            from clue_adv.regularizers import registry

            err.print(f"[bold red]error:[/] unknown strategy {name!r}; valid: {', '.join(registry())}")
            raise typer.Exit(2)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    if name is not None:
        r = rows[0]
        out.print(f"[bold]{r['name']}[/]: {r['summary']}", highlight=False)
        cost = f"{r['forward']} forward, {r['backward']} backward" + (
            " + double backward" if r["double_backward"] else ""
        )
        out.print(f"cost per step: {cost}", highlight=False)
        table = Table("parameter", "default", "description", show_lines=True)
        for key, p in r["parameters"].items():
            table.add_row(key, repr(p["default"]), p["description"] or "")
        out.print(table)
        return
    table = Table(title="strategies: cost per training step (`clue-adv strategies NAME` for details)")
    for col in ("name", "what it does", "fwd", "bwd", "double bwd", "parameters (defaults)"):
        table.add_column(col, overflow="fold")
    for r in rows:
        params = ", ".join(f"{k}={p['default']}" for k, p in r["parameters"].items())
        double = "yes" if r["double_backward"] else "no"
        table.add_row(r["name"], r["summary"], str(r["forward"]), str(r["backward"]), double, params)
    out.print(table)


def main() -> None:  # pragma: no cover - console-script shim
    app()
