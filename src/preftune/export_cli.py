"""`preftune export RUN --merge`: a LoRA run's adapter folded into its base model."""

from __future__ import annotations

import json
import re
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


def _run_folder(adapter: Path) -> Path:
    """The run an adapter belongs to: the parent of final/, two levels above a checkpoint."""
    return adapter.parent.parent if adapter.parent.name == "checkpoints" else adapter.parent


def _checkpoint_step(adapter: Path) -> int | None:
    """The step of a checkpoint folder (checkpoints/step-000300), None for final/."""
    match = re.fullmatch(r"step-(\d+)", adapter.name)
    return int(match.group(1)) if match and adapter.parent.name == "checkpoints" else None


def _default_target(adapter: Path) -> Path:
    """RUN/merged for final/, RUN/merged-step-000300 for a checkpoint: never inside checkpoints/."""
    run = _run_folder(adapter)
    return run / ("merged" if adapter.parent.name != "checkpoints" else f"merged-{adapter.name}")


@app.command("export")
def export(
    run: Path = typer.Argument(..., help="Run folder (train.output_dir), its final/, or a checkpoint."),
    merge: bool = typer.Option(False, "--merge", help="Fold the LoRA adapter into the base weights."),
    out: Path | None = typer.Option(None, help="Where to write the model (default: RUN/merged, or "
                                    "RUN/merged-step-N for a checkpoint). An earlier export there is replaced."),
    base: str | None = typer.Option(None, help="Base model (default: the run's model.path)."),
):
    """Write a LoRA run's policy as a plain model folder that from_pretrained loads."""
    if not merge:
        raise UserError("preftune export writes a merged model; add --merge (the adapter itself "
                        "is in RUN/final already, loadable by peft).")
    adapter = _adapter_folder(run)
    from preftune.evaluate import EXPORT_RECORD, run_config
    from preftune.lora import merge_adapter
    from preftune.model_card import CARD_NAME, model_card, run_metrics

    run_cfg = run_config(adapter)  # beside final/, or two levels above a checkpoint
    model_cfg = run_cfg.get("model", {})
    base_path = base or model_cfg.get("path") or \
        json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_path:
        raise UserError(f"{adapter}: cannot tell the base model; pass --base.")
    target = Path(out) if out is not None else _default_target(adapter)
    # An export replaces an earlier export, and nothing else (not a base model given as --out).
    if target.exists() and any(target.iterdir()) and not (target / EXPORT_RECORD).exists():
        raise UserError(f"--out {target} already exists and is not a model preftune exported; "
                        "choose another --out, or remove it first.")
    # What `preftune eval` reads to evaluate the merged model with the run's own settings
    # (beta, loss, max_length; the base as reference), as it does for RUN/final.
    record = {"adapter": str(adapter.resolve()), "base": base_path, "run_config": run_cfg}
    # The card names the model these weights were merged onto (--base), not the run's model.path.
    card_cfg = {**run_cfg, "model": {**model_cfg, "path": base_path}}
    # A checkpoint's card holds the numbers up to its step, not the steps the run took after it.
    step = _checkpoint_step(adapter)
    metrics = [m for m in run_metrics(_run_folder(adapter)) if step is None or m.get("step", 0) <= step]
    title = f"{_run_folder(adapter).name}{'' if step is None else f', step {step}'}, merged"
    card = model_card(card_cfg, metrics, adapter=False, world_size=None, title=title)
    written = merge_adapter(adapter, base_path, model_cfg.get("dtype", "float32"), target,
                            extra_files={EXPORT_RECORD: yaml.safe_dump(record, sort_keys=False),
                                         CARD_NAME: card},
                            setting="--base" if base else "the run's model.path (or --base)")
    typer.echo(f"merged model: {written}")
