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

ConfigArg = Annotated[Path, typer.Option("--config", "-c", help="Run config (YAML).")]
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
def validate(configs: Annotated[list[Path], typer.Argument(help="Config files to check.")]) -> None:
    """Check configs without training; every problem of every file is reported."""
    from clue_adv.validate import validate_file

    bad = 0
    for path in configs:
        problems = validate_file(path)
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
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List every strategy with its parameters, defaults and cost per training step."""
    from clue_adv.regularizers import registry

    rows = []
    for name, cls in registry().items():
        cost = cls(cls.config_class()).cost()
        params = {
            key: {"default": field.default, "description": field.description}
            for key, field in cls.config_class.model_fields.items()
            if key != "name"
        }
        rows.append(
            {
                "name": name,
                "summary": cls.summary,
                "forward": cost.forward,
                "backward": cost.backward,
                "double_backward": cost.double_backward,
                "parameters": params,
            }
        )
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    table = Table(title="strategies (cost per training step, default parameters)", show_lines=True)
    for col in ("name", "what it does", "fwd", "bwd", "double bwd", "parameters (default)"):
        table.add_column(col)
    for r in rows:
        params = "\n".join(f"{k} = {v['default']!r}: {v['description']}" for k, v in r["parameters"].items())
        table.add_row(
            r["name"],
            r["summary"],
            str(r["forward"]),
            str(r["backward"]),
            "yes" if r["double_backward"] else "no",
            params,
        )
    out.print(table)


def main() -> None:  # pragma: no cover - console-script shim
    app()
