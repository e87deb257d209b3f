"""The `clue-adv` command: wiring only; the work happens in config/train/sweep/report."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console

from clue_adv import cli_output
from clue_adv.errors import ClueAdvError, sigterm_as_interrupt

if TYPE_CHECKING:  # the sweep module is imported when a sweep command runs, not at start-up
    from clue_adv.sweep import SweepPlan

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
    typer.Option(
        "--config",
        "-c",
        help="Run config (YAML); repeat to merge, later files override earlier ones (and name the variant folder "
        "<experiment>+<file name> when they change the run).",
    ),
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", "-s", help="Override a field: --set optim.lr=3e-5 (repeatable).")
]
OutputOpt = Annotated[
    Path | None, typer.Option("--output-dir", "-o", help="Root of run directories (default: the config's).")
]


def _show_version(value: bool) -> None:
    if value:
        import clue_adv

        out.print(f"clue-adv {clue_adv.__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", metavar="", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Options before the command (`clue-adv --version`)."""


def _fail(e: ClueAdvError) -> NoReturn:
    err.print(f"[bold red]error:[/] {e}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(e.exit_code)


def _run_to_the_end(load: Callable[[], Any], run: Callable[[Any], Any], interrupted: str) -> Any:
    """`run(load())` with SIGTERM read as Ctrl-C (train and pretrain): a bad config or input exits with its message
    and code, an interrupt with `interrupted` and 130 (what a shell reports for SIGINT)."""
    try:
        cfg = load()
        with sigterm_as_interrupt():
            return run(cfg)
    except ClueAdvError as e:
        _fail(e)
    except KeyboardInterrupt:
        err.print(interrupted)
        raise typer.Exit(130) from None


@app.command()
def train(
    config: ConfigArg,
    set_: SetOpt = None,
    output_dir: OutputOpt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            metavar="",
            help="Rerun even if this run already completed; start over instead of resuming a checkpoint.",
        ),
    ] = False,
) -> None:
    """Train one run from a YAML config and evaluate it on dev every epoch."""
    from clue_adv.config import as_variant, load_config

    def run(cfg: Any) -> Any:
        from clue_adv.train import train as run_training  # after the config is read: a bad one fails fast

        return run_training(cfg, output_dir, force=force, console=err)

    outcome = _run_to_the_end(
        # an override file's or --set variant has its own folder
        lambda: as_variant(load_config(config, set_ or []), set_ or [], config),
        run,
        "interrupted: the run is marked 'interrupted'; rerun the same command to start it again",
    )
    if outcome.skipped:
        err.print(f"already completed: {outcome.directory} (use --force to rerun)", highlight=False)
    cli_output.print_train_result(out, outcome.summary, outcome.directory)


@app.command()
def validate(
    configs: Annotated[
        list[Path] | None, typer.Argument(help="Run configs or sweep files (every cell), each checked on its own.")
    ] = None,
    merged: Annotated[
        list[Path] | None,
        typer.Option(
            "--config",
            "-c",
            help="Check these files merged into one, exactly as `train -c A -c B` (or `sweep -c SWEEP -c B`) reads "
            "them; repeatable, later files win.",
        ),
    ] = None,
    merge_with: Annotated[
        list[Path] | None, typer.Option("--with", help="Merge this file over each config first (e.g. an override).")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Check configs and sweeps without training: schema, paths and data contents; every problem is reported."""
    from clue_adv.validate import validate_file

    if not configs and not merged:
        _fail(ClueAdvError("give config files to check (each on its own), or -c FILE [-c FILE...] to check a merge"))
    # each positional file on its own (with --with merged over it), then the -c files as one merged config
    checks = [([path, *(merge_with or [])], str(path)) for path in configs or []]
    if merged:
        checks.append(([*merged, *(merge_with or [])], " + ".join(map(str, merged))))
    bad = 0
    for files, label in checks:
        notes: list[str] = []  # what could not be checked here (e.g. a hub model's config not cached): not errors
        problems = validate_file(files, set_ or [], notes=notes)
        if problems:
            bad += 1
            err.print(f"[red]✗[/] {label}", highlight=False, soft_wrap=True)
            for p in problems:
                err.print(f"    - {p}", highlight=False, markup=False)
        else:
            out.print(f"[green]✓[/] {label}", highlight=False, soft_wrap=True)
        for note in notes:
            kind = "warning" if note.startswith("HF_") else "note"  # an offline hub (checks.offline_hub_warning)
            err.print(f"    {kind}: {note}", highlight=False, markup=False, soft_wrap=True)
    if bad and len(configs or []) > 1:  # `validate run.yaml overrides/tiny.yaml` checks the override as a run
        err.print(
            "note: each file named without -c is checked on its own; to check files merged, as `train -c A -c B` "
            "reads them, give each with -c",
            highlight=False,
        )
    if bad:
        raise typer.Exit(2)


@app.command()
def strategies(
    name: Annotated[str | None, typer.Argument(help="Show one strategy's parameters in full.")] = None,
    as_json: Annotated[bool, typer.Option("--json", metavar="", help="Machine-readable output.")] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="With NAME: cost it with these settings, e.g. --set mode=finite_difference."),
    ] = None,
) -> None:
    """List every strategy with its cost per training step; with NAME, its parameters and defaults."""
    from clue_adv.regularizers import describe_strategies, registry

    if name is not None and name not in registry():
        # `strategies --json true`: a flag's value is read as NAME
        flag = " (--json is a flag and takes no value)" if name.lower() in ("true", "false", "yes", "no") else ""
        err.print(f"[bold red]error:[/] unknown strategy {name!r}{flag}; valid: {', '.join(registry())}")
        raise typer.Exit(2)
    if set_ and name is None:
        err.print("[bold red]error:[/] --set needs a strategy NAME (e.g. clue-adv strategies pgd --set steps=5)")
        raise typer.Exit(2)
    configs = {}
    if set_:
        from clue_adv.config import apply_override, parse_config

        data: dict[str, Any] = {"task": "tnews", "strategy": {"name": name}}
        try:
            for assignment in set_:
                # `steps=5` and `strategy.steps=5` both name the strategy's field
                key = assignment.partition("=")[0].strip().removeprefix("strategy.")
                if key in ("name", ""):
                    raise ClueAdvError(f"--set {assignment}: give the strategy as NAME, and its fields with --set")
                apply_override(data, assignment if assignment.startswith("strategy.") else f"strategy.{assignment}")
            configs[name] = parse_config(data, source="--set").strategy
        except ClueAdvError as e:
            _fail(e)
    rows = describe_strategies(configs)
    if name is not None:
        rows = [r for r in rows if r["name"] == name]
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2, default=str) + "\n")
        return
    if name is not None:
        cli_output.print_strategy(out, rows[0])
    else:
        cli_output.print_strategy_list(out, rows)


def main() -> None:  # pragma: no cover - console-script shim
    app()


# --------------------------------------------------------------------------------------------------
# Sweeps, reports, predictions (logic in clue_adv/sweep/, report/, predict.py)


MetricOpt = Annotated[
    str,
    typer.Option(
        "--metric",
        help="Which dev accuracy the printed table shows: `best` (the best epoch's, the study's protocol) or "
        "`final` (the last epoch's, the CLUE protocol). report.md always has both.",
    ),
]


def _check_metric(metric: str) -> None:
    from clue_adv.report import METRICS

    if metric not in METRICS:
        _fail(ClueAdvError(f"--metric: {metric!r} is not one of {', '.join(METRICS)}"))


@app.command()
def sweep(
    configs: Annotated[
        list[Path],
        typer.Option(
            "--config",
            "-c",
            help="Sweep file (YAML), e.g. sweeps/smoke.yaml; repeat to merge run configs over every cell, later "
            "files win (-c sweeps/smoke.yaml -c overrides/tiny.yaml), and name the variant, as on train.",
        ),
    ],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", "-s", help="Override a run field in every cell: --set epochs=1 (repeatable)."),
    ] = None,
    output_dir: OutputOpt = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            metavar="",  # a flag: no `<bool>` in --help
            help="List the planned runs and which are done; with --executor slurm also the sbatch script and "
            "which array task holds which run. Submits nothing.",
        ),
    ] = False,
    status: Annotated[
        bool,
        typer.Option(
            "--status",
            metavar="",
            help="Show each run's state from its directory (completed, running, pending in Slurm, failed, not "
            "started), whatever executor ran it. Runs nothing.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", metavar="", help="Rerun every cell, completed ones too.")] = False,
    jobs: Annotated[
        int | None, typer.Option("--jobs", "-j", min=1, help="Runs at once (default: 1, or one per device).")
    ] = None,
    devices: Annotated[
        str | None, typer.Option("--devices", help="GPUs to use, one run per device: --devices 0,1,2,3.")
    ] = None,
    executor: Annotated[
        str,
        typer.Option(
            "--executor",
            help="`local`: this machine; `slurm`: a Slurm job array through submitit (resources from the sweep's "
            "`slurm` block); `submitit-local`: the same submitit path run on this machine (a rehearsal).",
        ),
    ] = "local",
    report: Annotated[
        bool, typer.Option("--report/--no-report", metavar="", help="Write the report and print the table at the end.")
    ] = True,
    metric: MetricOpt = "best",
) -> None:
    """Run a grid of runs (tasks × strategies × hyperparameters × seeds); resumes where it stopped."""
    from clue_adv.sweep import check_executor, load_plan, plan_data_problems, run_sweep

    config, extra = configs[0], configs[1:]

    try:
        check_executor(executor)
    except ClueAdvError as e:
        _fail(e)
    _check_metric(metric)
    try:
        plan = load_plan(config, output_dir, set_ or [], force=force and not status, configs=list(extra))
    except ClueAdvError as e:
        _fail(e)
    done = sum(c.done for c in plan.cells)
    from clue_adv.checks import Sources, offline_hub_warning

    # before anything runs (and in --dry-run): an offline environment cannot reach the hub the cells name
    if not status and (offline := offline_hub_warning([Sources.of(c.config) for c in plan.cells])):
        err.print(f"[yellow]warning:[/] {offline}", highlight=False, soft_wrap=True)
    if status:
        _print_status(plan, config)
        return
    # The same data checks `clue-adv validate` runs, before any cell starts: a bad labels.json would otherwise
    # fail each of its cells only after the model has loaded.
    problems = plan_data_problems(plan)
    data_error = ClueAdvError(
        f"{config}: {len(problems)} problem(s) in the data its runs read; no run was started", problems
    )
    if dry_run:
        _print_dry_run(plan, config, force, executor)
        if problems:
            _fail(data_error)
        return
    if problems:
        _fail(data_error)
    device_list = [d.strip() for d in devices.split(",") if d.strip()] if devices is not None else None
    err.print(f"sweep {config}: {len(plan.cells)} run(s), {done} already completed", highlight=False)
    try:
        result = run_sweep(
            plan,
            force=force,
            jobs=jobs,
            devices=device_list,
            executor=executor,
            console=err,
            command=shlex.join(["clue-adv", *sys.argv[1:]]),
        )
    except ClueAdvError as e:
        _fail(e)
    counts = {s: len(result.by_status(s)) for s in ("completed", "skipped", "failed", "interrupted")}
    err.print(", ".join(f"{n} {s}" for s, n in counts.items()), highlight=False)
    for r in result.by_status("failed"):
        err.print(f"[red]failed[/] {r.cell.name}: {r.error or 'see its summary.json'}", highlight=False)
    if report and not result.interrupted:
        from clue_adv.report.console import report_after_sweep

        single = len(plan.experiments) == 1
        root = plan.output_dir / plan.experiments[0] if single else plan.output_dir
        report_after_sweep(out, err, root, plan.experiments, metric)
    if result.interrupted:
        err.print("interrupted: rerun the same command to resume", highlight=False)
    if result.exit_code:
        raise typer.Exit(result.exit_code)


def _print_status(plan: SweepPlan, config: Path) -> None:
    from clue_adv.sweep import STATUS_ORDER, sweep_status

    title = f"{config}: {len(plan.cells)} run(s)"
    cli_output.print_sweep_status(out, plan, sweep_status(plan), STATUS_ORDER, title)


def _print_dry_run(plan: SweepPlan, config: Path, force: bool, executor: str) -> None:
    from clue_adv.sweep import sbatch_script, submission

    todo, queued = submission(plan, force)
    slurm = executor == "slurm"
    done = sum(c.done for c in plan.cells)
    title = f"{config}: {len(plan.cells)} run(s), {done} already completed"
    cli_output.print_dry_run(out, plan, title, force, todo, queued, slurm)
    if slurm and todo:
        try:
            script = sbatch_script(plan, len(todo))
        except ClueAdvError as e:
            _fail(e)
        kind = f"a job array of {len(todo)} task(s)" if len(todo) > 1 else "one job"
        out.print(f"\nsbatch script ({kind}; submitit writes it at submission):", highlight=False)
        out.print(script, highlight=False, markup=False, soft_wrap=True)


@app.command()
def report(
    results_dir: Annotated[Path, typer.Argument(help="Results directory: a root, an experiment or a task.")],
    fmt: Annotated[
        str,
        typer.Option("--format", "-f", help="Print the main table as rich (terminal), md, csv, json or latex."),
    ] = "rich",
    output: Annotated[
        Path | None, typer.Option("--output", help="Where report.md, CSVs and plots go (default: RESULTS_DIR).")
    ] = None,
    plots: Annotated[bool, typer.Option("--plots/--no-plots", metavar="", help="Draw the PNG plots.")] = True,
    metric: MetricOpt = "best",
    table: Annotated[
        str,
        typer.Option(
            "--table",
            help="Which table to print: `accuracy` (the main table) or `diagnostics` (input-gradient norm, curvature, "
            "train/dev gap, accuracy under attack; of the best model, or the final one with --metric final). "
            "report.md has both.",
        ),
    ] = "accuracy",
) -> None:
    """Tables, CSVs and plots from run directories (works on partial sweeps)."""
    from clue_adv.report import FORMATS, TABLES, build_report
    from clue_adv.report.console import print_report

    if fmt not in FORMATS:
        err.print(f"[bold red]error:[/] --format: {fmt!r} is not one of {', '.join(FORMATS)}")
        raise typer.Exit(2)
    if table not in TABLES:
        err.print(f"[bold red]error:[/] --table: {table!r} is not one of {', '.join(TABLES)}")
        raise typer.Exit(2)
    _check_metric(metric)
    try:
        built = build_report(results_dir, output, plots=plots)
    except ClueAdvError as e:
        _fail(e)
    print_report(out, err, built, results_dir, table, fmt, metric)


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="A finished run directory with a saved model (save_model: true).")],
    test_file: Annotated[Path, typer.Option("--test-file", "-t", help="CLUE test file (JSON lines with ids).")],
    output: Annotated[
        Path | None, typer.Option("--output", help="Submission file (default: RUN/<task>_predict.json).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="Default: the run's eval size.")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")] = "auto",
    allow_incomplete: Annotated[
        bool,
        typer.Option(
            "--allow-incomplete", metavar="", help="Predict with an interrupted/failed run's best model so far."
        ),
    ] = False,
) -> None:
    """Write the CLUE submission file (tnews_predict.json / iflytek_predict.json) for a test file."""
    from clue_adv.predict import predict as run_predict

    if device not in ("auto", "cpu", "cuda"):
        err.print(f"[bold red]error:[/] --device: {device!r} is not one of auto, cpu, cuda")
        raise typer.Exit(2)
    try:
        result = run_predict(
            run, test_file, output, batch_size=batch_size, device=device, allow_incomplete=allow_incomplete
        )
    except ClueAdvError as e:
        _fail(e)
    for warning in result.warnings:
        err.print(f"[yellow]warning:[/] {warning}", highlight=False)
    err.print(f"{len(result.ids)} predictions written to {result.path}", highlight=False)


# --------------------------------------------------------------------------------------------------
# Pretraining (logic in clue_adv/pretrain/)


PretrainConfigArg = Annotated[
    list[Path],
    typer.Option(
        "--config", "-c", help="Pretrain config (YAML, e.g. configs/pretrain/tnews-tiny.yaml); repeat to merge."
    ),
]


@app.command()
def pretrain(
    config: PretrainConfigArg,
    set_: SetOpt = None,
    output_dir: OutputOpt = None,
    force: Annotated[
        bool, typer.Option("--force", metavar="", help="Start over, even if the pretrain completed.")
    ] = False,
) -> None:
    """Masked-LM pretraining on the task's training text; writes a model directory to fine-tune from. Resumable."""
    from clue_adv.pretrain.config import load_pretrain_config

    def run(cfg: Any) -> Any:
        from clue_adv.pretrain.run import pretrain as run_pretraining  # after the config is read

        return run_pretraining(cfg, output_dir, force=force, console=err)

    outcome = _run_to_the_end(
        lambda: load_pretrain_config(config, set_ or []),
        run,
        "interrupted: the pretrain is checkpointed; rerun the same command to resume it",
    )
    if outcome.skipped:
        err.print(f"already completed: {outcome.directory} (use --force to start over)", highlight=False)
    cli_output.print_pretrain_result(out, outcome.summary, outcome.model_dir)
