"""Ctrl-C in the first seconds of any `preftune` command, while torch and transformers import."""

from __future__ import annotations

import re
import subprocess
import sys
from textwrap import dedent

from reliability_helpers import REPO


def test_ctrl_c_while_torch_imports_says_one_line_and_exits_130():
    """It printed a long KeyboardInterrupt traceback through the module being imported; now the
    command pyproject installs ends with one line and status 130."""
    # [project.scripts]; read with a pattern, as tomllib is not there on Python 3.10
    module, function = re.search(r'^preftune = "([\w.]+):(\w+)"$',
                                 (REPO / "pyproject.toml").read_text(), re.M).groups()
    # The console script pip writes for it, with Ctrl-C arriving as torch starts to load.
    script = dedent(f"""
        import sys

        class CtrlCWhileTorchImports:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    raise KeyboardInterrupt
                return None

        sys.meta_path.insert(0, CtrlCWhileTorchImports())
        sys.argv = ["preftune", "label", "status", "--db", "labels.sqlite"]
        from {module} import {function}
        sys.exit({function}())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO,
                          timeout=120)
    assert done.returncode == 130, done.stderr
    assert done.stderr == "preftune: stopped by Ctrl-C while starting; nothing was done.\n"
    assert done.stdout == ""
