"""`preftune report`: the command-line face of `preftune.report.write_report`.

Mounted by `preftune.cli` (the typer `app` here holds the one `report` command). A `UserError`
propagates to the top-level CLI, which prints its sentence and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from preftune.errors import UserError
from preftune.report import write_report

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
    check_run_dir(run_dir, out)
    path = write_report(run_dir, eval_paths=eval_files or [], smoothing=smoothing, output_dir=out)
    typer.echo(f"report: {path}")
