"""Ctrl-C in the first seconds of any `preftune` command, while its modules import."""

from __future__ import annotations

import re
import subprocess
import sys
from textwrap import dedent

from reliability_helpers import REPO


def _stopped_while_importing(module_name: str, *argv: str) -> subprocess.CompletedProcess:
    """The console script pip writes for [project.scripts], with Ctrl-C arriving as `module_name`
    starts to load."""
    # Read with a pattern, as tomllib is not there on Python 3.10.
    module, function = re.search(r'^preftune = "([\w.]+):(\w+)"$',
                                 (REPO / "pyproject.toml").read_text(), re.M).groups()
    script = dedent(f"""
        import sys

        class CtrlCWhileImporting:
            def find_spec(self, name, path=None, target=None):
                if name == {module_name!r}:
                    raise KeyboardInterrupt
                return None

        sys.meta_path.insert(0, CtrlCWhileImporting())
        sys.argv = ["preftune", *{list(argv)!r}]
        from {module} import {function}
        sys.exit({function}())
    """)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_ctrl_c_while_the_cli_imports_says_one_line_and_exits_130():
    """It printed a long KeyboardInterrupt traceback through the module being imported; now the
    command pyproject installs ends with one line and status 130."""
    done = _stopped_while_importing("typer", "label", "status", "--db", "labels.sqlite")
    assert done.returncode == 130, done.stderr
    assert done.stderr == "preftune: stopped by Ctrl-C while starting; nothing was done.\n"
    assert done.stdout == ""


def test_ctrl_c_while_a_command_imports_torch_exits_130_without_a_traceback():
    """Since c627197 a command imports torch when it runs, not with the CLI: a Ctrl-C then ends
    it as typer ends any command stopped by Ctrl-C, status 130 and no traceback."""
    done = _stopped_while_importing("torch", "sample", "--model", "m", "--prompts", "p.txt",
                                    "--out", "o.jsonl")
    assert done.returncode == 130, done.stderr
    assert done.stderr == "" and done.stdout == ""
