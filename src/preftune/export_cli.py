"""`preftune export RUN --merge`: a LoRA run's adapter folded into its base model."""

from __future__ import annotations

import json
from pathlib import Path

import typer
import yaml

from preftune.errors import UserError

app = typer.Typer(no_args_is_help=True)


def _adapter_folder(run: Path) -> Path:
    """RUN itself when it holds an adapter (final/ or a checkpoint), else RUN/final."""
    for folder in (run, run / "final"):
        if (folder / "adapter_config.json").exists():
            return folder
    if (run / "final" / "config.json").exists() or (run / "config.json").exists():
        raise UserError(f"{run} holds full model weights, already loadable by from_pretrained; "
                        "export --merge is for runs trained with model.lora.")
    raise UserError(f"{run}: no adapter_config.json in it or in {run / 'final'}; pass a run folder "
                    "(train.output_dir), its final/ or one of its checkpoints.")


def _run_config(adapter: Path) -> dict:
    """The run's config.yaml (beside final/ or two levels above a checkpoint), if found."""
    for candidate in (adapter.parent / "config.yaml", adapter.parent.parent / "config.yaml"):
        if candidate.exists():
            return yaml.safe_load(candidate.read_text()) or {}
    return {}


@app.command("export")
def export(
    run: Path = typer.Argument(..., help="Run folder (train.output_dir), its final/, or a checkpoint."),
    merge: bool = typer.Option(False, "--merge", help="Fold the LoRA adapter into the base weights."),
    out: Path | None = typer.Option(None, help="Where to write the model (default: RUN/merged)."),
    base: str | None = typer.Option(None, help="Base model (default: the run's model.path)."),
):
    """Write a LoRA run's policy as a plain model folder that from_pretrained loads."""
    if not merge:
        raise UserError("preftune export writes a merged model; add --merge (the adapter itself "
                        "is in RUN/final already, loadable by peft).")
    adapter = _adapter_folder(run)
    model_cfg = _run_config(adapter).get("model", {})
    base_path = base or model_cfg.get("path") or \
        json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_path:
        raise UserError(f"{adapter}: cannot tell the base model; pass --base.")
    from preftune.lora import merge_adapter

    target = out or (run if adapter == run / "final" else adapter.parent) / "merged"
    written = merge_adapter(adapter, base_path, model_cfg.get("dtype", "float32"), Path(target))
    typer.echo(f"merged model: {written}")
