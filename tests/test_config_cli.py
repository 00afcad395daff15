"""`preftune config show`: what a user who installed preftune with pip (no configs/, no
docs/CONFIG.md) has to see every key, and a config as `train` reads and records it."""

from __future__ import annotations

import re

import pytest
import yaml
from test_config import _schema_defaults
from typer.testing import CliRunner

from preftune.cli import app
from preftune.config import Config, validate_config
from preftune.errors import UserError


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def relative_config(tmp_path, tiny_llama, pairs_file, monkeypatch):
    """A tiny one-step run whose data and output folder are relative to the current folder."""
    monkeypatch.chdir(tmp_path)
    raw = {"model": {"path": str(tiny_llama)}, "data": {"train": pairs_file.name, "max_length": 64},
           "train": {"batch_size": 4, "max_steps": 1, "progress": False, "report": False, "output_dir": "run"}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_show_prints_what_train_writes_to_config_yaml(tmp_path, relative_config, one_torch_thread):
    shown = cli("config", "show", relative_config, "optim.lr=1e-3")
    assert shown.exit_code == 0, shown.output
    assert not (tmp_path / "run").exists()  # it only reads the config: no run folder
    assert cli("train", relative_config, "optim.lr=1e-3").exit_code == 0
    written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert yaml.safe_load(shown.output) == written
    # Local paths absolute, as train records them, so the printed config works from any folder.
    assert written["data"]["train"] == str(tmp_path / "pairs.jsonl")
    assert written["train"]["output_dir"] == str(tmp_path / "run")


@pytest.mark.parametrize("file_text, overrides", [
    ("model: {path: m}\ndata: {train: t.jsonl}\noptim: {learning_rate: 1.0e-6}\n", []),
    ("model: {path: m}\ndata: {train: t.jsonl}\n", ["loss.bta=0.2"]),
])
def test_show_refuses_a_bad_config_with_trains_sentence(tmp_path, file_text, overrides):
    path = tmp_path / "c.yaml"
    path.write_text(file_text)
    shown, trained = cli("config", "show", path, *overrides), cli("train", path, *overrides)
    assert shown.exit_code == trained.exit_code == 2
    assert "unknown key" in shown.output and "Traceback" not in shown.output
    assert shown.output == trained.output


def test_show_without_a_config_lists_every_key_with_its_default_and_the_required_ones():
    result = cli("config", "show")
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    schema = _schema_defaults(Config)
    assert list(shown) == list(Config.model_fields)  # every section, in the schema's order
    for section, keys in shown.items():
        assert list(keys) == list(Config.model_fields[section].annotation.model_fields)
        for key, value in keys.items():
            expected = schema[f"{section}.{key}"]
            assert value == (None if expected == "required" else expected), f"{section}.{key}"
    # The required keys say so where they stand; the config is not runnable as it is.
    required = [key for key, default in schema.items() if default == "required" and key.count(".") == 1]
    assert required == ["model.path", "data.train"]
    for key in required:
        section, name = key.split(".")
        block = result.output.split(f"\n{section}:\n", 1)[1]
        assert re.search(rf"^  {name}: null  # required", block, re.M), result.output
    with pytest.raises(UserError, match="model.path"):
        validate_config(shown)
    # A section off by default (model.lora) lists its own keys and defaults in its comment.
    subsections = {key.rsplit(".", 1)[0] for key in schema if key.count(".") == 2}
    assert subsections == {"model.lora", "model.reference_sync"}
    for subsection in subsections:
        name = subsection.split(".")[1]
        line = re.search(rf"^  {name}: null  # .*defaults shown\): (\{{.*\}})$", result.output, re.M)
        assert line, (subsection, result.output)
        assert yaml.safe_load(line.group(1)) == {key.rsplit(".", 1)[1]: default for key, default in schema.items()
                                                 if key.startswith(subsection + ".")}


def test_train_help_points_to_config_show():
    # An installed preftune has no configs/ or docs/CONFIG.md to point to.
    result = cli("train", "--help")
    assert "preftune config show" in " ".join(result.output.replace("│", " ").split())
