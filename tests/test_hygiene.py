"""Check what is committed: notebooks without outputs, and the same packages and pins in both installs."""

from __future__ import annotations

import nbformat
import pytest
import yaml

from cet.book import ROOT

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")

# Folders that hold executed or installed copies, not the committed sources.
_NOT_SOURCES = {".venv", "_build", ".ipynb_checkpoints", ".git", "results"}
COMMITTED_NOTEBOOKS = sorted(path for path in ROOT.rglob("*.ipynb")
                             if not _NOT_SOURCES & set(path.relative_to(ROOT).parts))


@pytest.mark.parametrize("notebook", COMMITTED_NOTEBOOKS, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_notebook_has_no_outputs(notebook):
    content = nbformat.read(notebook, as_version=4)
    code = [(i, cell) for i, cell in enumerate(content.cells) if cell.cell_type == "code"]
    with_outputs = [i for i, cell in code if cell.get("outputs")]
    executed = [i for i, cell in code if cell.get("execution_count") is not None]
    assert with_outputs == [], f"{notebook.name} has outputs in cells {with_outputs}; clear them before committing"
    assert executed == [], f"{notebook.name} has execution counts in cells {executed}; clear them before committing"


def test_notebook_with_outputs_detected(tmp_path):
    notebook = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("1 + 1", execution_count=1)
    cell.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"}, execution_count=1)]
    notebook.cells = [cell]
    path = tmp_path / "executed.ipynb"
    nbformat.write(notebook, path)
    with pytest.raises(AssertionError, match="executed.ipynb has outputs in cells \\[0\\]"):
        test_committed_notebook_has_no_outputs(path)


def _pyproject_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = [requirement for group in project["optional-dependencies"].values() for requirement in group]
    return sorted(project["dependencies"] + extras)


def _environment_requirements():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    [pip_section] = [entry for entry in environment["dependencies"] if isinstance(entry, dict)]
    # "-e ." installs the project itself, which pyproject.toml describes.
    return sorted(requirement for requirement in pip_section["pip"] if requirement != "-e .")


def test_environment_matches_pyproject():
    assert _environment_requirements() == _pyproject_requirements()


def test_environment_python_allowed():
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    [python] = [entry for entry in environment["dependencies"] if isinstance(entry, str) and entry.startswith("python=")]
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert requires.startswith(">=")
    minimum = tuple(int(part) for part in requires.removeprefix(">=").split("."))
    version = tuple(int(part) for part in python.removeprefix("python=").split("."))
    assert version >= minimum


def test_pages_workflow_uses_makefile():
    workflow = yaml.safe_load((ROOT / ".github" / "workflows" / "book.yml").read_text())
    steps = workflow["jobs"]["build"]["steps"]
    commands = [step["run"] for step in steps if "run" in step]
    assert "make test" in commands
    assert "make book" in commands
    assert "make check-book PROFILE=full" in commands
    [upload] = [step for step in steps if step.get("uses", "").startswith("actions/upload-pages-artifact")]
    assert upload["with"]["path"] == "_build/html"
    deploy = workflow["jobs"]["deploy"]["steps"]
    assert any(step.get("uses", "").startswith("actions/deploy-pages") for step in deploy)
