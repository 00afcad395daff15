"""What `pip install preftune` gives a user outside this repository: every module's imports
installed, the labeling page's files inside the wheel, and a `--version` that tells the truth.

The full check builds the wheel and installs it in a fresh virtual environment (too slow and
too networked for a unit test); these read pyproject.toml and the source instead:
    python -m build --outdir /tmp/dist . && python3 -m venv /tmp/v && /tmp/v/bin/pip install \
        /tmp/dist/preftune-*.whl && cd /tmp && /tmp/v/bin/preftune --version
"""

from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from typer.testing import CliRunner

import preftune
from preftune.cli import app

tomllib = pytest.importorskip("tomllib")

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "preftune"


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_level_modules(source: Path) -> set[str]:
    """Absolute imports a run can reach: those under `if TYPE_CHECKING:` never execute."""
    modules = set()

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            modules.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source.read_text(encoding="utf-8")))
    return modules


def test_every_imported_package_is_declared_in_pyproject():
    # huggingface_hub, pyarrow and jinja2 were imported by preftune but declared nowhere: they
    # came only through transformers, datasets and torch, whose requirements may drop them.
    project = _project()
    extras = {name: reqs for name, reqs in project["project"]["optional-dependencies"].items() if name != "dev"}
    declared = {_normalized(Requirement(r).name) for r in project["project"]["dependencies"]}
    declared |= {_normalized(Requirement(r).name) for reqs in extras.values() for r in reqs}
    distributions = packages_distributions()
    undeclared = {}
    for source in sorted(PACKAGE.rglob("*.py")):
        for module in _imported_top_level_modules(source):
            if module in sys.stdlib_module_names or module == "preftune":
                continue
            names = {_normalized(d) for d in distributions.get(module, [module])}
            if not names & declared:
                undeclared.setdefault(module, source.relative_to(PACKAGE).as_posix())
    assert not undeclared, f"imported but not in pyproject's dependencies or extras: {undeclared}"


def test_every_data_file_of_the_package_is_in_package_data():
    # setuptools puts only .py files in the wheel unless [tool.setuptools.package-data] names
    # the others: a static file or template it misses is a 404 on `preftune label serve`.
    patterns = _project()["tool"]["setuptools"]["package-data"]["preftune"]
    shipped = {path for pattern in patterns for path in PACKAGE.glob(pattern)}
    data_files = {path for path in PACKAGE.rglob("*") if path.is_file() and path.suffix not in (".py", ".pyc")
                  and "__pycache__" not in path.parts}
    assert data_files, "the labeling page's templates and static files are missing from src/preftune"
    missing = sorted(p.relative_to(PACKAGE).as_posix() for p in data_files - shipped)
    assert not missing, f"not matched by pyproject's package-data, so left out of the wheel: {missing}"


def test_version_option_prints_the_version_pyproject_installs():
    assert preftune.__version__ == _project()["project"]["version"]
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0, result.output
    assert result.output == f"preftune {preftune.__version__}\n"


def test_license_is_the_spdx_string_setuptools_will_keep_accepting():
    # A TOML table here warns on every build that builds stop working after 2027-02-18.
    assert _project()["project"]["license"] == "Apache-2.0"


def test_the_license_text_ships_with_the_license_it_declares():
    # Apache-2.0 asks that its text travel with the work; setuptools packs LICENSE into the wheel.
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
