"""`preftune export RUN`: a LoRA run's adapter, folded into its base model (--merge) or copied
to name its base by hub id (--base-id), ready to publish."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated

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


def _default_target(adapter: Path, kind: str = "merged") -> Path:
    """RUN/merged for final/, RUN/merged-step-000300 for a checkpoint: never inside checkpoints/."""
    run = _run_folder(adapter)
    return run / (kind if adapter.parent.name != "checkpoints" else f"{kind}-{adapter.name}")


# An adapter folder's files a user publishes: not a checkpoint's optimizer and training state.
_ADAPTER_FILES = ("adapter_model.safetensors", "special_tokens_map.json", "chat_template.jinja",
                  "merges.txt", "added_tokens.json")


def _copy_adapter(adapter: Path, base_id: str, target: Path, extra_files: dict[str, str]) -> Path:
    """The adapter in a new folder whose adapter_config.json names `base_id` as its base; the
    run's own folder is left as it is (resume and eval load the base from there)."""
    import shutil

    from preftune.checkpoint import write_folder_atomically
    from preftune.model_card import cached_hub_id
    from preftune.modeling import TOKENIZER_FILES

    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    written = config.get("base_model_name_or_path")
    if cached_hub_id(written) == base_id:  # a checkpoint (or an older final/) names base_id's snapshot folder
        config["revision"] = Path(written).name  # the commit, as final/ names it
    elif written != base_id:  # a revision (commit) of the base named there is none of base_id's
        config["revision"] = None
    config["base_model_name_or_path"] = base_id

    def fill(tmp: Path) -> None:
        for name in dict.fromkeys((*_ADAPTER_FILES, *TOKENIZER_FILES)):
            if (adapter / name).is_file():
                shutil.copy2(adapter / name, tmp / name)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for name, text in extra_files.items():
            (tmp / name).write_text(text, encoding="utf-8")

    return write_folder_atomically(target, fill, "the adapter",
                                   then="any earlier export there is intact; free some space and run the export again")


@app.command("export")
def export(
    run: Path = typer.Argument(..., help="Run folder (train.output_dir), its final/, or a checkpoint."),
    merge: bool = typer.Option(False, "--merge", help="Fold the LoRA adapter into the base weights."),
    out: Path | None = typer.Option(None, help="Where to write the model (default: RUN/merged, or "
                                    "RUN/merged-step-N for a checkpoint; RUN/adapter without --merge). "
                                    "An earlier export there is replaced."),
    base: str | None = typer.Option(None, help="Base model (default: the run's model.path)."),
    # Annotated, so that a call from Python that leaves it out gets None, not typer's OptionInfo.
    base_id: Annotated[str | None, typer.Option(
        "--base-id", help="The base's hub id (ORG/NAME), written into the card and, without --merge, into "
                          "a copy of the adapter's adapter_config.json, for a run trained from a local folder.")] = None,
):
    """Write a LoRA run's policy as a folder others can load: merged, or an adapter naming a hub base."""
    from preftune.model_card import cached_hub_id, hub_id

    if base_id is not None and not hub_id(base_id):
        raise UserError(f"--base-id {base_id!r} is not a hub id; give the base model's id on the Hugging Face "
                        "Hub, as ORG/NAME.")
    adapter = _adapter_folder(run)
    from preftune.evaluate import EXPORT_RECORD, run_config
    from preftune.model_card import CARD_NAME, model_card, run_metrics

    run_cfg = run_config(adapter)  # beside final/, or two levels above a checkpoint
    model_cfg = run_cfg.get("model", {})
    written_base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    base_path = base or model_cfg.get("path") or written_base
    if not base_path:
        raise UserError(f"{adapter}: cannot tell the base model; pass --base.")
    # What others load the base from: --base-id, or the id of a base read from the hub cache.
    public_base = base_id or hub_id(base_path) or cached_hub_id(str(base_path))
    if not merge and public_base is None:
        raise UserError(f"{adapter / 'adapter_config.json'} names the local base {written_base or base_path}, "
                        "which loads only on this machine; add --base-id ORG/NAME (the base's hub id) to write "
                        "a copy of the adapter that names it, or --merge for a model that needs no base.")
    target = Path(out) if out is not None else _default_target(adapter, "merged" if merge else "adapter")
    # An export replaces an earlier export, and nothing else (not a base model given as --out).
    if target.exists() and any(target.iterdir()) and not (target / EXPORT_RECORD).exists():
        raise UserError(f"--out {target} already exists and is not a model preftune exported; "
                        "choose another --out, or remove it first.")
    # What `preftune eval` reads to evaluate the export with the run's own settings
    # (beta, loss, max_length; the base as reference), as it does for RUN/final.
    record = {"adapter": str(adapter.resolve()), "base": base_path, "run_config": run_cfg}
    # The card names the model these weights were merged onto (--base), not the run's model.path.
    card_cfg = {**run_cfg, "model": {**model_cfg, "path": public_base or base_path}}
    # A checkpoint's card holds the numbers up to its step, not the steps the run took after it.
    step = _checkpoint_step(adapter)
    metrics = [m for m in run_metrics(_run_folder(adapter)) if step is None or m.get("step", 0) <= step]
    title = f"{_run_folder(adapter).name}{'' if step is None else f', step {step}'}{', merged' if merge else ''}"
    card = model_card(card_cfg, metrics, adapter=not merge, world_size=None, title=title)
    extra_files = {EXPORT_RECORD: yaml.safe_dump(record, sort_keys=False), CARD_NAME: card}
    if not merge:
        written = _copy_adapter(adapter, public_base, target, extra_files)
        typer.echo(f"adapter naming base {public_base}: {written}")
        return
    from preftune.lora import merge_adapter

    written = merge_adapter(adapter, base_path, model_cfg.get("dtype", "float32"), target,
                            extra_files=extra_files,
                            setting="--base" if base else "the run's model.path (or --base)")
    typer.echo(f"merged model: {written}")
    if public_base is None:
        typer.echo(f"Its base is the local folder {base_path}, so its card gives the Hub no base_model; add "
                   "--base-id ORG/NAME to name the base's hub id there.")
