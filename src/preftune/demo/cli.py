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


@app.command()
def demo(
    out: Path = typer.Option("runs/demo", help="Folder for every artefact (resumes there)."),
    quick: bool = typer.Option(False, "--quick", help="Test size: a smaller model and data set."),
    human: bool = typer.Option(False, "--human", help="Label the pairs yourself in the browser."),
    seed: int = typer.Option(0, help="Seed of the world, the models, sampling and labels."),
    betas: str | None = typer.Option(
        None, help="DPO betas, comma-separated (default: 0.1,0.5,1; --quick: 0.1)."),
    threads: int = typer.Option(
        1, help="torch CPU threads; 1 is fastest for these tiny models and on a shared machine."),
    host: str = typer.Option("127.0.0.1", help="--human: address of the labeling server."),
    port: int = typer.Option(8000, help="--human: port of the labeling server."),
    target: int = typer.Option(64, help="--human: continue once this many pairs are labelled."),
):
    """Sample, label, train DPO and a baseline, evaluate: the DPO paper's sentiment task in small."""
    import torch
    from rich.console import Console

    from preftune.demo.pipeline import HumanLabeling, run_demo
    from preftune.demo.summary import print_summary

    if threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}.")
    torch.set_num_threads(threads)
    console = Console()
    if not console.is_terminal:  # a log file: rich's 80 columns would wrap every table row
        console = Console(width=120)
    sizes = demo_sizes(quick, seed, betas)
    labeling = HumanLabeling(host=host, port=port, target=target) if human else None
    command = "preftune " + shlex.join(["demo", *sys.argv[2:]]) if sys.argv[1:2] == ["demo"] \
        else "preftune demo"
    summary = run_demo(out, sizes, echo=lambda m: console.print(m, highlight=False),
                       progress=sys.stdout.isatty(), human=labeling, command=command)
    console.print()
    print_summary(summary, console)
