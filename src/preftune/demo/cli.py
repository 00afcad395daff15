"""`preftune demo`: the whole DPO loop offline in a few minutes (see `preftune.demo.pipeline`).

The main CLI mounts this module's `app` commands at the top level.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import replace
from pathlib import Path

import typer

from preftune.errors import UserError

app = typer.Typer(help="The DPO loop end to end on a synthetic task, offline.")


def parse_betas(text: str) -> tuple[float, ...]:
    """"0.05,0.1,0.5" -> (0.05, 0.1, 0.5): positive, distinct, in the order given."""
    try:
        betas = [float(part) for part in text.replace(" ", ",").split(",") if part]
    except ValueError:
        raise UserError(f"--betas {text!r}: give numbers separated by commas, e.g. 0.05,0.1,0.5.") from None
    if not betas or not all(0 < b < float("inf") for b in betas):
        raise UserError(f"--betas {text!r}: every beta must be a positive number.")
    return tuple(dict.fromkeys(betas))


def demo_sizes(quick: bool, seed: int, betas: str | None):
    """The preset for --quick or full size, with the user's seed and betas."""
    from preftune.demo.pipeline import FULL_SIZES, QUICK_SIZES

    sizes = QUICK_SIZES if quick else FULL_SIZES
    if betas is not None:
        sizes = replace(sizes, betas=parse_betas(betas))
    return replace(sizes, seed=seed, pretrain=replace(sizes.pretrain, seed=seed))


MAX_SEED = 2**32 - 2  # numpy and torch take seeds below 2**32; evaluation samples with seed + 1
HUMAN_ONLY = ("host", "port", "target")


def check_options(ctx: typer.Context, seed: int, threads: int, human: bool, port: int,
                  target: int, min_target: int) -> None:
    """Every bad option in one sentence before any work (some would fail only minutes later)."""
    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}.")
    if not 0 <= seed <= MAX_SEED:
        raise UserError(f"--seed must be between 0 and {MAX_SEED}, got {seed}.")
    if not human:
        # By name: typer keeps its own copy of click, whose ParameterSource is another class.
        given = [f"--{name}" for name in HUMAN_ONLY
                 if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") == "COMMANDLINE"]
        if given:
            raise UserError(f"{', '.join(given)} only {'applies' if len(given) == 1 else 'apply'} to "
                            "--human (labeling in the browser); add --human or leave "
                            f"{'it' if len(given) == 1 else 'them'} out.")
        return
    if not 1 <= port <= 65535:
        raise UserError(f"--port must be between 1 and 65535, got {port}.")
    if target < min_target:
        raise UserError(f"--target must be at least {min_target}, one training batch of "
                        f"preferences at this size, got {target}.")


@app.command()
def demo(
    ctx: typer.Context,
    out: Path = typer.Option(
        "runs/demo", help="Folder for every artefact: new, empty, or an earlier demo's, which "
        "the demo continues (finished steps are kept)."),
    quick: bool = typer.Option(
        False, "--quick", help="Test size, about 20 s: a smaller model and data set (its numbers "
        "are not README's). Without it: about 3-5 min on 2 CPU cores."),
    human: bool = typer.Option(False, "--human", help="Label the pairs yourself in the browser."),
    seed: int = typer.Option(0, help="Seed of the world, the models, sampling and labels."),
    betas: str | None = typer.Option(
        None, help="DPO betas, comma-separated (default: 0.1,0.5,1; --quick: 0.1)."),
    threads: int = typer.Option(
        1, help="torch CPU threads; 1 is fastest for these tiny models and on a shared machine."),
    host: str = typer.Option("127.0.0.1", help="--human: address of the labeling server."),
    port: int = typer.Option(8000, help="--human: port of the labeling server."),
    target: int = typer.Option(
        64, help="--human: continue once this many pairs are labelled (at least one training "
        "batch: 32, --quick 16)."),
):
    """Sample, label, train DPO and a baseline, evaluate: the DPO paper's sentiment task in small.

    Exit status 1 when a check of the result says NO (everything is still written); Ctrl-C or
    SIGTERM stop it with a message (exit status 130); the same command then continues.
    """
    import torch
    from rich.console import Console
    from rich.markup import escape

    from preftune.demo.pipeline import DemoStopped, HumanLabeling, run_demo
    from preftune.demo.summary import failed_checks, print_summary

    sizes = demo_sizes(quick, seed if 0 <= seed <= MAX_SEED else 0, betas)
    check_options(ctx, seed, threads, human, port, target, min_target=sizes.batch_size)
    torch.set_num_threads(threads)
    console = Console()
    if not console.is_terminal:  # a log file: rich's 80 columns would wrap every table row
        console = Console(width=120)
    labeling = HumanLabeling(host=host, port=port, target=target) if human else None
    command = "preftune " + shlex.join(["demo", *sys.argv[2:]]) if sys.argv[1:2] == ["demo"] \
        else "preftune demo"
    try:
        # Plain text, wrapped by the terminal: a path stays whole (copyable, clickable) and a
        # "[name]" in it is not taken for a rich style.
        summary = run_demo(out, sizes, echo=lambda m: console.print(m, highlight=False, markup=False,
                                                                    soft_wrap=True),
                           progress=sys.stdout.isatty(), human=labeling, command=command)
    except DemoStopped as stop:
        console.print(f"\n[yellow]{escape(str(stop))}[/yellow]", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    console.print()
    print_summary(summary, console, out=out)
    if failed_checks(summary):  # every file is written; the exit status says a claim failed
        raise typer.Exit(1)
