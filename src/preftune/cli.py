"""The `preftune` command: parse, validate, call the library. No logic lives here."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from preftune.errors import UserError

err_console = Console(stderr=True)


class FriendlyGroup(TyperGroup):
    """The top-level command group: a UserError raised by any sub-command is printed as its one
    sentence and the process exits 2, instead of a traceback. Sub-apps stay untouched, so their
    own tests still see the exception."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            # The message is text, not markup: `pip install 'preftune[lora]'` and a path with
            # brackets must print as they are (an unmatched `[/b]` would even raise).
            err_console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None


app = typer.Typer(cls=FriendlyGroup, help="Direct Preference Optimization: sample, label, train, evaluate, report.",
                    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(cls=FriendlyGroup, help="Look at preference data before training on it.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _print_version(asked: bool) -> None:
    if asked:
        from preftune import __version__

        typer.echo(f"preftune {__version__}")
        raise typer.Exit()


@app.callback()
def _top_level_options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print preftune's version and exit."),
):
    # Only for --version, which a bug report asks for; each command does the work.
    pass


@app.command()
def train(
    config: Path = typer.Argument(..., help="YAML config; `preftune config show` prints every key with its default "
                                  "(in the repository: examples in configs/, every key explained in docs/CONFIG.md)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. optim.lr=5e-7"),
    resume: bool = typer.Option(False, "--resume", help="Continue from the newest good checkpoint."),
    resume_from: Optional[Path] = typer.Option(None, help="Continue from this checkpoint folder."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the run already in train.output_dir "
                                   "(metrics, checkpoints, final policy, report) and start over."),
    nproc: int = typer.Option(1, min=1, help="Processes on this node (launches torchrun)."),
):
    """Train a policy with DPO (or another preference loss) against a frozen reference."""
    from preftune.config import load_config
    from preftune.distributed import rank_errors

    with rank_errors():  # under torchrun: one message for a failure, not one per process
        cfg = load_config(config, overrides or [])
        if nproc > 1 and "WORLD_SIZE" not in os.environ:
            from preftune.distributed import resolve_strategy
            from preftune.launch import launch_torchrun

            resolve_strategy(cfg.train.distributed, nproc, nproc_option=True)  # before any worker starts
            raise typer.Exit(launch_torchrun(nproc, sys.argv))
        if nproc > 1 and (here := int(os.environ.get("LOCAL_WORLD_SIZE", nproc))) != nproc:
            # It trained on the launcher's number of processes, and so on another global batch.
            # (torchrun itself refuses --nproc as ambiguous; accelerate launch passes it on.)
            from preftune.errors import UserError

            raise UserError(f"--nproc {nproc}, but the launcher (torchrun, accelerate launch) started {here} "
                            "processes on this machine, and its count decides; leave --nproc out.")
        from preftune.train import train as run_training

        run_training(cfg, resume=str(resume_from) if resume_from else resume, overwrite=overwrite)


@data_app.command("inspect")
def data_inspect(
    file: str = typer.Argument(..., help="A data file, a save_to_disk folder, or a hub id."),
    model: str = typer.Option(..., "--model", "--tokenizer", help="Model or tokenizer folder for token counts."),
    max_length: Optional[int] = typer.Option(1024, help="data.max_length to check against."),
    truncation: str = typer.Option("keep_end", help="keep_end or keep_start"),
    split: str = typer.Option("train", help="The split to read when FILE is a hub id or a DatasetDict folder."),
    data_config: Optional[str] = typer.Option(
        None, "--data-config", help="The config (subset) of FILE, a hub id or folder whose README.md declares several."),
):
    """Counts, token-length histograms, skipped rows and one rendered example."""
    from pydantic import ValidationError

    from preftune.config import DataConfig
    from preftune.data.inspect import inspect_file
    from preftune.modeling import load_tokenizer

    try:
        data_cfg = DataConfig(train=file, max_length=max_length, truncation=truncation)
    except ValidationError as e:  # a bad FILE, --max-length or --truncation: one sentence, not a traceback
        error = e.errors()[0]
        field = str(error["loc"][0])
        option = "FILE" if field == "train" else "--" + field.replace("_", "-")  # FILE is data.train here
        raise UserError(f"{option} {error['input']!r}: {error['msg'].removeprefix('Value error, ')}.") from None
    inspect_file(file, load_tokenizer(model, setting="--model"), data_cfg, Console(), split, data_config)


@app.command("make-tiny-model")
def make_tiny_model(
    folder: Path = typer.Argument(..., help="Where to write the model and tokenizer."),
    arch: str = typer.Option("llama", help="llama, qwen2 or gpt2"),
    seed: int = typer.Option(0, help="Seed of the random weights."),
    texts: Optional[Path] = typer.Option(
        None, help="A text file whose lines train the tokenizer (default: a small built-in corpus)."),
):
    """Build a tiny random model and tokenizer for smoke tests, offline."""
    from preftune.demo.tiny import FAMILIES, save_tiny_model
    from preftune.modeling import quiet_transformers

    # Said here in one sentence: deeper down they are build_model's ValueError and mkdir's FileExistsError.
    if arch not in FAMILIES:
        raise UserError(f"--arch {arch!r} is not a tiny model family; use {', '.join(FAMILIES[:-1])} or {FAMILIES[-1]}.")
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file; pass a folder to write the model and tokenizer into.")

    quiet_transformers()  # no "Writing model shards" bar for a one-file model
    kwargs = {}
    if texts is not None:  # byte-level BPE tokenizes any text; a corpus only shapes its merges
        if not texts.is_file():
            raise UserError(f"--texts {texts} does not exist; pass a text file, or leave --texts out.")
        kwargs["texts"] = [line for line in texts.read_text(encoding="utf-8").splitlines() if line.strip()]
    print(save_tiny_model(folder, arch, seed=seed, **kwargs))


def _mount_subcommands() -> None:
    """Sub-apps of the other parts of the loop, each in its own module."""
    import importlib

    for module, name in (("preftune.sampling_cli", None), ("preftune.labeling.cli", "label"),
                         ("preftune.report_cli", None), ("preftune.eval_cli", "eval"),
                         ("preftune.demo.cli", None), ("preftune.export_cli", None),
                         ("preftune.config_cli", "config")):
        try:
            sub = importlib.import_module(module).app
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        if name:
            app.add_typer(sub, name=name)
        else:
            for command in sub.registered_commands:
                app.registered_commands.append(command)


_mount_subcommands()


def show_warnings_as_one_line() -> None:
    """preftune's own warnings speak to the user (a corrupt checkpoint passed over, a prompt whose
    last token merges with the completion); Python's default format adds the source file and the
    line of code that warned, which read like a traceback. Other packages' keep that format."""
    import warnings

    package = str(Path(__file__).parent)
    default = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):
        if str(filename).startswith(package):
            return f"warning: {message}\n"
        return default(message, category, filename, lineno, line)

    warnings.formatwarning = one_line


def main() -> None:
    show_warnings_as_one_line()
    app()


if __name__ == "__main__":
    main()
