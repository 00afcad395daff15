"""`preftune report`: the command-line face of `preftune.report.write_report`.

Mounted by `preftune.cli` (the typer `app` here holds the one `report` command). A `UserError`
propagates to the top-level CLI, which prints its sentence and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from preftune.report import write_report

app = typer.Typer(add_completion=False, no_args_is_help=True)


@app.command("report")
def report(
    run_dir: Annotated[Path, typer.Argument(help="Run folder of `preftune train` (its train.output_dir).")],
    eval_files: Annotated[list[Path] | None, typer.Option(
        "--eval", help="More eval.json files (or JSON lists of evaluations) to include; "
        "repeatable. Every eval.json below RUN_DIR is included anyway.",
    )] = None,
    smoothing: Annotated[float, typer.Option(
        help="EMA weight for noisy training curves, in [0, 1); 0 = raw only.",
    )] = 0.6,
    out: Annotated[Path | None, typer.Option(
        help="Folder for report.html and plots/ (default: RUN_DIR).",
    )] = None,
) -> None:
    """Write report.html and PNG plots (loss, rewards, accuracy, reward vs KL, win rates)."""
    path = write_report(run_dir, eval_paths=eval_files or [], smoothing=smoothing, output_dir=out)
    typer.echo(f"report: {path}")
