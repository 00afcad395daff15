"""`preftune report`: the command-line face of `preftune.report.write_report` (one run) and
`preftune.report_compare.write_comparison` (several).

Mounted by `preftune.cli` (the typer `app` here holds the one `report` command). A `UserError`
propagates to the top-level CLI, which prints its sentence and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from preftune.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True)


def check_run_dir(run_dir: Path, out: Path | None) -> None:
    """Refuse, in one sentence, a file for the folder and the one folder whose report.html is
    not `preftune report`'s to replace: a demo's, which holds the demo's own page."""
    if run_dir.is_file():
        folder = run_dir.parent if run_dir.name in ("metrics.jsonl", "config.yaml", "eval.json") \
            else None
        hint = f"pass its folder, {folder}" if folder else "pass the folder `preftune train` wrote"
        raise UserError(f"{run_dir} is a file, not a run folder; {hint}.")
    demo = (run_dir / "demo.json").is_file() and (run_dir / "pi_sft").is_dir()
    if demo and (out is None or out.resolve() == run_dir.resolve()):
        runs = sorted(p for p in (run_dir / "runs").glob("*") if p.is_dir())
        example = runs[0] if runs else run_dir / "runs" / "NAME"
        raise UserError(f"{run_dir} is a `preftune demo` folder, whose report.html is the demo's "
                        "own page: run the same `preftune demo` again to refresh it (finished steps "
                        f"are kept), report one of its runs (e.g. {example}), "
                        "or write this report elsewhere with --out.")


@app.command("report")
def report(
    run_dirs: Annotated[list[Path], typer.Argument(
        help="Run folder of `preftune train` (its train.output_dir); several are compared on one page.",
        metavar="RUN_DIR...", show_default=False)],
    eval_files: Annotated[list[Path] | None, typer.Option(
        "--eval", help="More eval.json files (or JSON lists of evaluations) to include; "
        "repeatable. Every eval.json below RUN_DIR is included anyway.",
    )] = None,
    smoothing: Annotated[float, typer.Option(
        help="EMA weight for noisy training curves, in [0, 1); 0 = raw only.",
    )] = 0.6,
    out: Annotated[Path | None, typer.Option(
        help="Folder for report.html and plots/ (default: RUN_DIR; required with several runs).",
    )] = None,
) -> None:
    """Write report.html and PNG plots (loss, rewards, accuracy, reward vs KL, win rates);
    with several run folders, one page that overlays their curves and tabulates what differs."""
    # Here, not at the top: importing matplotlib would slow every other command's start.
    from preftune.report import write_report
    from preftune.report_compare import write_comparison

    if out is not None and out.is_file():  # else a NotADirectoryError from mkdir of out/plots
        raise UserError(f"--out {out} is a file; name a folder for report.html and plots/ "
                        "(created if missing).")
    if len(run_dirs) == 1:
        check_run_dir(run_dirs[0], out)
        path = write_report(run_dirs[0], eval_paths=eval_files or [], smoothing=smoothing,
                            output_dir=out)
    else:
        check_comparison(run_dirs, eval_files, out)
        path = write_comparison(run_dirs, out, smoothing=smoothing)
    typer.echo(f"report: {path}")


def check_comparison(run_dirs: list[Path], eval_files: list[Path] | None, out: Path | None) -> None:
    """A comparison has no default folder: each run's own one holds that run's report."""
    if out is None:
        parent = run_dirs[0].parent
        raise UserError(f"comparing {len(run_dirs)} runs needs --out DIR, the folder for the "
                        "comparison's report.html and plots (each run keeps its own report), "
                        f"e.g. --out {parent / 'compare'}.")
    if eval_files:
        raise UserError("--eval adds evaluations to one run's report; to compare runs, keep each "
                        "run's eval.json in its folder (`preftune eval` writes it beside final/), "
                        "where the comparison finds it.")
