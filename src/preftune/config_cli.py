"""`preftune config ...`: a config as `train` reads it, for users who have no configs/ or
docs/CONFIG.md (a pip install ships neither).

Mounted by `preftune.cli` as the `config` sub-command. A `UserError` reaches the top-level CLI,
which prints its sentence and exits with status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
import yaml

app = typer.Typer(help="See every config key with its default, or a config as train reads it.",
                  no_args_is_help=True)


@app.command()
def show(
    config: Optional[Path] = typer.Argument(
        None, help="YAML config, checked as train checks it (without loading the model or data, or making "
        "any folder) and printed as train writes OUTPUT/config.yaml: local paths that exist here absolute, "
        "train.output_dir absolute. Left out: every key with its default, and the required ones to set."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. optim.lr=5e-7"),
):
    """Print a config as YAML with every key, defaults filled in (no CONFIG: the defaults)."""
    from preftune.config import config_yaml, load_config, with_absolute_paths

    if config is None:
        typer.echo(defaults_yaml(), nl=False)
        return
    typer.echo(config_yaml(with_absolute_paths(load_config(config, overrides or []))), nl=False)


def defaults_yaml() -> str:
    """Every section and key of the schema with its default, as config.yaml writes them. A required
    key is null with a comment saying so (null is refused for it, so this is not a runnable
    config as it is); a section that is off by default (model.lora) lists its keys in a comment."""
    from pydantic import BaseModel

    from preftune.config import Config, validate_config

    required, notes = [], {}
    for section, field in Config.model_fields.items():
        for key, inner in field.annotation.model_fields.items():
            if inner.is_required():
                required.append((section, key))
                notes[section, key] = "required: no default; set it"
            members = getattr(inner.annotation, "__args__", ())
            if sub := next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel)), None):
                keys = yaml.safe_dump(sub().model_dump(mode="json"), default_flow_style=True, sort_keys=False)
                notes[section, key] = f"off; to turn it on, give it these keys (defaults shown): {keys.strip()}"
    placeholders: dict = {}
    for section, key in required:  # a value for each, to fill in every other key's default
        placeholders.setdefault(section, {})[key] = "required"
    raw = validate_config(placeholders).model_dump(mode="json")
    for section, key in required:
        raw[section][key] = None
    names = " and ".join(f"{section}.{key}" for section, key in required)
    lines = ["# Every key of a preftune config, with its default (preftune config show).",
             f"# {names} are required: set them; any other key may be left out, and then",
             "# has the default shown. Relative paths are read from the folder train runs in.", ""]
    section = None
    for line in yaml.safe_dump(raw, sort_keys=False).splitlines():
        if not line.startswith(" "):
            section = line.rstrip(":")
        key = line.strip().split(":", 1)[0]
        note = notes.get((section, key)) if line.startswith("  ") and not line.startswith("   ") else None
        lines.append(f"{line}  # {note}" if note else line)
    return "\n".join(lines) + "\n"
