"""What `pip install preftune` gives a user outside this repository: every module's imports
installed, the labeling page's files inside the wheel, and a `--version` that tells the truth.

The full check builds the wheel and installs it in a fresh virtual environment (too slow and
too networked for a unit test); these read pyproject.toml and the source instead:
    python -m build --outdir /tmp/dist . && python3 -m venv /tmp/v && /tmp/v/bin/pip install \
        /tmp/dist/preftune-*.whl && cd /tmp && /tmp/v/bin/preftune --version
and for the sdist, built from a clean copy, unpacked, installed and its tests run:
    git archive HEAD | tar -x -C /tmp/sd && python -m build --sdist --outdir /tmp/sddist /tmp/sd
    tar -xzf /tmp/sddist/preftune-*.tar.gz -C /tmp/u && /tmp/v/bin/pip install torch==2.13.0 \
        "$(ls -d /tmp/u/preftune-*)[dev]" && cd /tmp/u/preftune-* && /tmp/v/bin/python -m pytest tests/test_config.py
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


# Paths a working tree holds that are not the project's: runs, caches, build outputs, wheels.
NOT_SHIPPED = ["runs/demo/config.yaml", "tests/labeling/runs/r/metrics.jsonl", "tests/.hypothesis/examples/a",
               "tests/__pycache__/conftest.cpython-311.pyc", "tests/.pytest_cache/v/cache",
               "tests/labels.sqlite-wal", "bench/wheels-gpu/torch-2.13.0-cp311-linux_x86_64.whl",
               "bench/wheels/pkg/setup.py", ".venv/lib/site.py", "build/lib/preftune/cli.py",
               "dist/preftune-0.1.0.tar.gz"]
# Tracked files the sdist leaves out on purpose: the lead's CI script and git's own settings.
REPOSITORY_ONLY = {".ci/run", ".gitignore"}


def test_manifest_ships_every_tracked_file_tests_and_docs_need_and_no_run_or_build_output(
        tmp_path, monkeypatch):
    # The sdist held only tests/test_*.py: without conftest.py, the helpers, the test subfolders,
    # examples/ and configs/, a packager could not run the tests from it. MANIFEST.in's rules run
    # through setuptools' own FileList over empty stand-ins of the tracked files: nothing is built.
    import subprocess

    if not (REPO / ".git").exists():
        pytest.skip("needs the git checkout (an unpacked sdist has no list of tracked files)")
    # The build backend's own reading of MANIFEST.in, not a copy of its rules.
    from setuptools.command.egg_info import FileList

    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.splitlines()
    for path in [*tracked, *NOT_SHIPPED]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    monkeypatch.chdir(tmp_path)
    files = FileList()
    for line in (REPO / "MANIFEST.in").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            files.process_template_line(line)
    shipped = set(files.files)
    missing = [p for p in tracked if p not in shipped and not p.startswith("src/") and p not in REPOSITORY_ONLY]
    assert not missing, f"tracked but not matched by MANIFEST.in, so missing from the sdist: {missing}"
    assert "tests/conftest.py" in shipped and "examples/tiny_prefs.jsonl" in shipped
    assert not shipped & set(NOT_SHIPPED), f"MANIFEST.in ships {sorted(shipped & set(NOT_SHIPPED))}"
